"""What a SignLock checkpoint's weight files hold, read from their safetensors headers before any tensor is loaded.

Every tensor of the model is accounted for, not only the compressed layers: transformers fills a missing tensor with
a fresh init (a random head, norms of ones) and goes on with a warning, and casts a stored tensor of another dtype.
A SignLock checkpoint is refused instead, naming the tensor: a file that was edited, truncated or mixed with another
export does not load as a model that looks fine and is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from ...errors import CorruptCheckpointError

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.uint8: "U8"}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor's header entry: shape, safetensors dtype name and the file holding it."""

    shape: list[int]
    dtype: str
    path: str


def read_stored(checkpoint_files) -> dict[str, StoredTensor]:
    """Header entries of every tensor in the checkpoint's safetensors files (other formats: none). A file that is
    not a readable safetensors file (truncated, a header that lies about its size) is a ``CorruptCheckpointError``
    naming it."""
    stored = {}
    for path in checkpoint_files or ():
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            continue
        try:
            with safe_open(path, "pt") as file:
                for key in file.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    piece = file.get_slice(key)
                    stored[key] = StoredTensor(list(piece.get_shape()), piece.get_dtype(), path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CorruptCheckpointError(f"{path} is not a readable safetensors file ({error}): the download was "
                                         "cut short or the file was edited. Download or export it again.") from None
    return stored


def read_tensor(entry: StoredTensor, key: str) -> torch.Tensor:
    """One stored tensor (small ones: the guard), with the file's errors typed."""
    try:
        with safe_open(entry.path, "pt") as file:
            return file.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{entry.path}: `{key}` cannot be read ({error})") from None


def check_every_tensor(model: torch.nn.Module, stored: dict[str, StoredTensor],
                       renamed: dict[str, str] | None = None) -> None:
    """Every tensor the model loads (its state dict, less the tied copies transformers does not store) is in the
    files, at the model's shape, in a dtype that loads into it without reinterpretation: float tensors stored as
    floats, byte payloads as bytes. ``renamed`` maps a model key to the key the file stores it under (a payload
    stored as ``<layer>.weight``). ``stored`` empty (a format other than safetensors): nothing to check against."""
    if not stored:
        return
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    for model_key, tensor in model.state_dict(keep_vars=True).items():
        if model_key in tied:
            continue
        key = (renamed or {}).get(model_key, model_key)
        entry = stored.get(key)
        layer, name = _owner(model, model_key)
        prefix = f"{layer}: " if layer else ""
        if entry is None:
            raise CorruptCheckpointError(
                f"{prefix}the checkpoint has no `{key}` tensor; transformers would load it as a fresh random init. "
                "The weight files were edited or a shard is missing: download or export the model again."
            )
        shape = list(tensor.shape)
        if entry.shape != shape:
            needs = f"the stored {name} has shape {entry.shape}, the layer record needs {shape}" if layer else \
                f"`{key}`: the stored tensor has shape {entry.shape}, the model needs {shape}"
            raise CorruptCheckpointError(f"{prefix}{needs} (a truncated file, a tensor from another checkpoint, or "
                                         "an edited config.json)")
        wanted = _DTYPE_NAMES.get(tensor.dtype)
        compatible = entry.dtype in FLOAT_DTYPES if tensor.dtype.is_floating_point else entry.dtype == wanted
        if wanted is not None and not compatible:
            raise CorruptCheckpointError(f"{prefix}`{key}` is stored as {entry.dtype}, which does not load into a "
                                         f"{tensor.dtype} tensor without reinterpreting its bytes")


def _owner(model: torch.nn.Module, key: str) -> tuple[str | None, str]:
    """The compressed layer (its weight's name) a stored tensor belongs to, if any, and the tensor's own name."""
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None, name
    return getattr(module, "param_name", None), name
