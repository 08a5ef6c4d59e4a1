"""Loading the MODEL argument of the evaluation commands: a local folder or a Hub id, dense or SignLock-compressed.

Fails early, with the argument's name, when a local folder has no config or no weights, instead of letting
``from_pretrained`` print a long stack about a file it could not find.
"""

from __future__ import annotations

import os

from ..errors import ModelLoadError, SignLockError
from ..paths import check_model_folder


def load_failure(argument: str, model, error: Exception) -> ModelLoadError:
    """The one-line error for a MODEL that transformers could not load (a config.json that is not JSON, a
    quantization_config that is not an object, a size mismatch), instead of its stack."""
    first_line = str(error).splitlines()[0][:300] if str(error) else ""
    return ModelLoadError(f"{argument} {str(model)!r} cannot be loaded ({type(error).__name__}: {first_line})")


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
        raise load_failure(argument, model, error) from error
