"""llm-compressor's points: GPTQ (``GPTQModifier``) of every target projection to 4 and 3 bits (int, symmetric, one
bf16 scale per group), calibrated on the protocol's calibration windows, saved as compressed-tensors
(``pack-quantized``) and loaded back with ``from_pretrained`` (which decompresses them to dense weights on the CPU:
compressed-tensors has no CPU kernel for these schemes).

Groups of 64, not the W4A16 / W3A16 presets' 128: SmolLM2's hidden size, 576, is not a multiple of 128, and
llm-compressor refuses a group that does not divide a layer's input (point ``W4A16-g128`` runs the preset to show
it). At 64, the codes and scales cost exactly 4.25 and 3.25 bits a weight.

Points: ``W4A16-g64``, ``W3A16-g64``, ``W4A16-g128``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import file_fields, folder_bytes, log, measure_loaded, run_points, saved_target_bits

POINTS = {"W4A16-g64": (4, 64), "W3A16-g64": (3, 64), "W4A16-g128": (4, 128)}


def recipe(bits: int, group: int):
    from llmcompressor.modifiers.quantization import GPTQModifier

    if group == 128:  # the preset, as a user would first try it
        return GPTQModifier(targets="Linear", scheme=f"W{bits}A16", ignore=["lm_head"])
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    return GPTQModifier(ignore=["lm_head"], config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                                         weights=weights)})


def point(protocol: dict, out: Path, name: str) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(protocol["threads"])
    torch.manual_seed(0)
    bits, group = POINTS[name]
    windows = protocol["calibration"]
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(protocol["model"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(protocol["model"])
    folder = out / name
    log(f"llm-compressor {name}: GPTQ over {len(windows)} calibration windows")
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe(bits, group),
            num_calibration_samples=len(windows), max_seq_length=max(len(w) for w in windows), batch_size=1,
            shuffle_calibration_samples=False, pipeline="sequential", output_dir=str(folder), save_compressed=True)
    quantize_s = time.perf_counter() - start
    del model
    fields = measure_loaded(lambda: AutoModelForCausalLM.from_pretrained(folder).eval(), protocol)
    return {**fields, **file_fields(protocol, folder_bytes(folder), saved_target_bits(folder, skip=("weight_shape",))),
            "quantize_s": quantize_s,
            "detail": f"int{bits} symmetric, group {group}, bf16 scales; loaded dense (decompressed)"}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    run_points("llm-compressor", POINTS, point)
