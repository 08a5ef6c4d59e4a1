"""Loading the MODEL argument of the evaluation commands: a local folder or a Hub id, dense or SignLock-compressed.

Fails early, with the argument's name, when a local folder has no config or no weights, instead of letting
``from_pretrained`` print a long stack about a file it could not find.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelLoadError, SignLockError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_folder(model: str | os.PathLike, argument: str = "MODEL") -> None:
    """Refuse a local folder that ``from_pretrained`` cannot load: missing, without ``config.json`` or weights.

    A string that is not an existing path is left alone: it may be a Hub id.
    """
    path = Path(model)
    if not path.exists():
        if str(model).startswith((".", "/", "~")) or os.sep in str(model).strip("/").replace("/", "", 1):
            raise ModelLoadError(f"{argument} {str(model)!r} does not exist: pass a model folder or a Hub id.")
        return
    if not path.is_dir():
        raise ModelLoadError(f"{argument} {str(model)!r} is a file; pass the folder `save_pretrained` wrote.")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{argument} {str(model)!r} has no config.json; pass a folder written by `save_pretrained`.")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{argument} {str(model)!r} has no weights (none of {', '.join(WEIGHT_FILES)}); pass a folder written by "
            "`save_pretrained`, or a run's output_dir after training finished."
        )


def load_causal_lm(model: str | os.PathLike, argument: str = "MODEL", **kwargs):
    """``AutoModelForCausalLM.from_pretrained(model, **kwargs)`` with the folder checks above; SignLock exports load
    through the registered quantizer (``import hf_signlock`` is all they need)."""
    from transformers import AutoModelForCausalLM

    check_model_folder(model, argument)
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except SignLockError:
        raise
    except (OSError, ValueError, AttributeError, TypeError, KeyError, RuntimeError) as error:
        # transformers' own errors on a malformed folder (a config.json that is not JSON, a quantization_config
        # that is not an object, a size mismatch): one typed line at the CLI instead of a stack
        raise ModelLoadError(f"{argument} {str(model)!r} cannot be loaded ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:300] if str(error) else ''})") from error
