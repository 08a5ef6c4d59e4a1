"""HQQ's points (``hqq``, its own API): half-quadratic quantization of every target projection to 2, 3 and 4 bits
in groups of 64 (axis 1), no calibration; scales and zeros in bf16, the compute dtype. Saved with
``save_quantized`` (``config.json`` + ``qmodel.pt``), loaded back with ``from_quantized`` on the CPU, where HQQ
dequantizes each layer in every forward (its fast kernels are GPU-only).

transformers' own ``HqqConfig`` path does not load in transformers 5.24 (its quantizer has no ``get_quantize_ops``:
"QuantizationMethod.HQQ is not available yet"), so this uses the library's API, as its README shows.

Points: ``4bit-g64``, ``3bit-g64``, ``2bit-g64``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common import file_fields, folder_bytes, log, measure_loaded, run_points

POINTS = {"4bit-g64": 4, "3bit-g64": 3, "2bit-g64": 2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def target_bits(model) -> float:
    """Bits HQQ stores for the target projections: packed codes, and the scale and zero of each group."""
    from hqq.core.quantize import HQQLinear

    bits = 0
    for module in model.modules():
        if isinstance(module, HQQLinear):
            tensors = [module.W_q, module.meta["scale"], module.meta["zero"]]
            bits += sum(8 * t.numel() * t.element_size() for t in tensors if hasattr(t, "numel"))
    return bits


def point(protocol: dict, out: Path, name: str) -> dict:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(protocol["threads"])
    model = AutoModelForCausalLM.from_pretrained(protocol["model"], dtype=torch.bfloat16)
    rotary = model.model.rotary_emb
    frequencies = rotary.inv_freq.clone()  # quantize_model casts every other module's buffers to the compute dtype
    log(f"hqq {name}: quantize")
    start = time.perf_counter()
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=POINTS[name], group_size=64, axis=1),
                                  compute_dtype=torch.bfloat16, device="cpu")
    quantize_s = time.perf_counter() - start
    rotary.inv_freq, rotary.original_inv_freq = frequencies, frequencies.clone()
    bits = target_bits(model)
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    AutoHQQHFModel.save_quantized(model, str(folder))
    for file in TOKENIZER_FILES:  # what a user downloads with it
        if (Path(protocol["model"]) / file).exists():
            shutil.copy(Path(protocol["model"]) / file, folder / file)
    del model

    def load():
        loaded = AutoHQQHFModel.from_quantized(str(folder), compute_dtype=torch.bfloat16, device="cpu")
        loaded.model.rotary_emb.inv_freq = frequencies
        loaded.model.rotary_emb.original_inv_freq = frequencies.clone()
        return loaded.eval()

    fields = measure_loaded(load, protocol)
    return {**fields, **file_fields(protocol, folder_bytes(folder), bits), "quantize_s": quantize_s,
            "detail": f"{POINTS[name]}-bit codes, group 64, bf16 scale and zero"}


if __name__ == "__main__":
    run_points("hqq", POINTS, point)
