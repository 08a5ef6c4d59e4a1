"""Bits per weight of a SignLock model: every stored bit of the target layers, per layer and in total.

Per layer: ``flip_bits`` are the bits that give the signs (the coded flip stream, or the packed signs when
``sign_source`` is "packed"), ``magnitude_bits`` the codec's tensors, ``other_bits`` the bias and the layer's record
in ``config.json`` counted as ``RECORD_BITS`` (its fields as eight 64-bit words: two checksums, two dimensions, flip
count, stream length, codec parameters, flags), not as the JSON text that spells them. ``bpw = total_bits / weights``. Written as ``bpw.json`` beside every
export; ``hf-signlock inspect`` shows it with the checkpoint's size on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .compressed_linear import SignLockLinear

BPW_NAME = "bpw.json"
RECORD_BITS = 8 * 64
_FIELDS = ("weights", "flips", "flip_bits", "magnitude_bits", "other_bits", "total_bits")


def _bits(tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8


def layer_bits(layer: SignLockLinear) -> dict[str, int]:
    stored = layer.stored_tensors()
    sign_name = "sign_bits" if "sign_bits" in stored else "flips"
    flip_bits = _bits(stored[sign_name])
    magnitude_bits = sum(_bits(t) for name, t in stored.items() if name != sign_name)
    other_bits = (_bits(layer.bias) if layer.bias is not None else 0) + RECORD_BITS
    weights = 1
    for size in layer.shape:
        weights *= size
    return {"weights": weights, "flips": layer.record["flips"] or 0, "flip_bits": flip_bits,
            "magnitude_bits": magnitude_bits, "other_bits": other_bits,
            "total_bits": flip_bits + magnitude_bits + other_bits}


def bits_report(model: nn.Module) -> dict:
    layers = {f"{name}.weight": layer_bits(module) for name, module in model.named_modules()
              if isinstance(module, SignLockLinear)}
    total = {field: sum(layer[field] for layer in layers.values()) for field in _FIELDS}
    config = model.config.quantization_config
    return {"bpw": total["total_bits"] / total["weights"] if total["weights"] else None, "total": total,
            "sign_source": config.sign_source, "codec": config.codec, "codec_params": config.codec_params,
            "layers": layers}


def write_bpw(model: nn.Module, folder: str | os.PathLike) -> dict:
    report = bits_report(model)
    Path(folder, BPW_NAME).write_text(json.dumps(report, indent=2))
    return report


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Size on disk of the model's weight files (safetensors shards)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
