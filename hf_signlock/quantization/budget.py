"""A budget for the whole file: ``bits_per_parameter`` -> the bits each target weight may spend.

``bits_per_parameter`` bounds every byte a user downloads for the model (the weight files, ``config.json`` and
``generation_config.json``: tensors, headers, layer records, guards) divided by the model's parameters. The tensors
that stay dense (norms, biases of non-target modules, an embedding that is not a target), their header entries, the
safetensors framing and the config files outside ``quantization_config`` are estimated from above; what is left is
shared by the target weights as a ``bits_per_weight`` budget, which ``quantize_model`` then holds layer by layer
(each layer's records, header entries and share of the SignLock overhead included). So the written file stays
within the whole-file budget; ``bits.checkpoint_report`` counts it from the files.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from ..errors import BudgetError
from .bits import header_entry_bytes

_SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
# 8-byte header length, the metadata entry, braces, and up to 7 bytes of alignment padding per weight file
_FRAMING_BYTES = 8 + len('{"__metadata__":{"format":"pt"},}') + 7


def dense_remnant_bytes(model: nn.Module, targets: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, int]:
    """Bytes of what no target layer accounts for, estimated from above: ``tensors`` stored dense (floating ones in
    ``dtype``) with their header entries, and ``files``: the safetensors framing and the config files without their
    ``quantization_config`` (which the layers' overhead holds)."""
    target_keys = {f"{name}.{part}" for name in targets for part in ("weight", "bias")}
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    offset = 10 ** len(str(total))  # offsets with one digit more than any this model's file can have
    seen = {state[key].data_ptr() for key in target_keys if key in state}  # a head tied to a target embedding too
    tensors = 0
    for key, tensor in state.items():
        if key in target_keys or (tensor.data_ptr() in seen and tensor.numel()):  # tied copies are saved once
            continue
        seen.add(tensor.data_ptr())
        stored = dtype if tensor.is_floating_point() else tensor.dtype
        tensors += tensor.numel() * stored.itemsize
        tensors += header_entry_bytes(key, _SAFETENSORS_NAMES.get(stored, "F32"), list(tensor.shape), offset, offset)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    files = _FRAMING_BYTES + len(json.dumps(config, indent=2, sort_keys=True)) + 64  # dtype and version may change
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        files += len(generation.to_json_string()) + 64
    return {"tensors": tensors, "files": files}


def bits_per_weight_for_file(model: nn.Module, targets: dict[str, nn.Module], bits_per_parameter: float,
                             dtype: torch.dtype) -> tuple[float, dict]:
    """The ``bits_per_weight`` of the target layers that keeps the whole file within ``bits_per_parameter``, and
    what it was derived from; a budget the dense remnants alone exceed is a ``BudgetError``."""
    if not (isinstance(bits_per_parameter, (int, float)) and math.isfinite(bits_per_parameter)
            and bits_per_parameter > 0):
        raise BudgetError(f"`bits_per_parameter` must be a finite number > 0, got {bits_per_parameter!r}.")
    parameters = sum(p.numel() for p in model.parameters())
    weights = sum(module.weight.numel() for module in targets.values())
    remnant = dense_remnant_bytes(model, targets, dtype)
    remnant_bits = 8 * (remnant["tensors"] + remnant["files"])
    bits_per_weight = (bits_per_parameter * parameters - remnant_bits) / weights
    derivation = {"bits_per_parameter": bits_per_parameter, "parameters": parameters, "target_weights": weights,
                  "dense_remnant_bytes": remnant, "bits_per_weight": bits_per_weight}
    if bits_per_weight <= 0:
        raise BudgetError(
            f"bits_per_parameter={bits_per_parameter} cannot be met: the tensors stored dense ({remnant['tensors']:,} "
            f"bytes in {str(dtype).removeprefix('torch.')}) and the config files ({remnant['files']:,} bytes) alone "
            f"take {remnant_bits / parameters:.3f} bits per parameter. Raise bits_per_parameter above that, compress "
            "the embeddings too (target_embeddings=True), or store the dense tensors in a smaller dtype."
        )
    return bits_per_weight, derivation
