"""bitsandbytes' points: 4-bit NF4 through transformers' ``BitsAndBytesConfig`` on the CPU (its CPU library ships in
the wheel), blocks of 64 weights, compute in bf16; with and without double quantization (the absmax of each block
itself quantized to 8 bits). No calibration. Saved with ``save_pretrained`` and loaded back with
``from_pretrained``; bits counted from the saved tensors of the target projections (codes, absmax, quant map and
state).

Points: ``nf4``, ``nf4-double``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common import file_fields, folder_bytes, log, measure_loaded, run_points, saved_target_bits

POINTS = {"nf4": False, "nf4-double": True}


def point(protocol: dict, out: Path, name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.set_num_threads(protocol["threads"])
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_use_double_quant=POINTS[name])
    log(f"bitsandbytes {name}: quantize on load")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(protocol["model"], dtype=torch.bfloat16, device_map="cpu",
                                                 quantization_config=config)
    quantize_s = time.perf_counter() - start
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(protocol["model"]).save_pretrained(folder)
    del model
    fields = measure_loaded(lambda: AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval(), protocol)
    return {**fields, **file_fields(protocol, folder_bytes(folder), saved_target_bits(folder)),
            "quantize_s": quantize_s, "detail": "NF4, blocks of 64" + (", double quant" if POINTS[name] else "")}


if __name__ == "__main__":
    run_points("bitsandbytes", POINTS, point)
