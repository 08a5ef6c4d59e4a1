"""Load time, size on disk and forward time of SignLock checkpoints vs the same model saved dense in bf16, one run.

Models: the quickstart run (if present) and a synthetic Llama (8 layers, width 512) built from a config with seeded
gap init. Each is exported with the vq codec at 1 bit per target weight (no refinement: speed and size only) and
saved dense in bf16. Measured in one process (files in the page cache), loads timed in alternation with the dense
one (ratios are medians of per-pair ratios):
``from_pretrained`` of the export (dequantize on load, and kept compressed: checked but not decoded) over
``from_pretrained(dense, dtype=bf16)``; the same loads followed by a one-token forward (the dense load maps the
file, so its weights are read on first use); safetensors bytes over the bf16 checkpoint's; forward time of compressed ``SignLockLinear`` modules (weights rebuilt on each
call) over dense modules.

    python bench/bench_load.py [--repeats 5]     # writes bench/results/load.{json,md}
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from timing import paired_seconds
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_signlock import SignLockConfig, apply_gap_init, quantize_model
from hf_signlock.quantization.bits import checkpoint_report

ROOT = Path(__file__).resolve().parent.parent


def checkpoint_bytes(folder: Path) -> int:
    """Size of a model's weight files."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def synthetic():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=4096)
    model = AutoModelForCausalLM.from_config(config)
    apply_gap_init(model, seed=0, gap=1.0)
    return model, 0


def quickstart():
    run = ROOT / "runs" / "quickstart"
    stats = json.loads((run / "signlock_stats.json").read_text())
    return AutoModelForCausalLM.from_pretrained(run), stats["seed"]


def measure(name: str, build, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, packed_dir, compressed_dir = Path(tmp, "dense"), Path(tmp, "signlock"), Path(tmp, "compressed")
        model, seed = build()
        model.to(torch.bfloat16).save_pretrained(dense_dir)
        for folder, dequantize in ((packed_dir, True), (compressed_dir, False)):
            model, seed = build()
            model.to(torch.bfloat16)  # non-target tensors in bf16 on both sides
            quantize_model(model, SignLockConfig(seed=seed, codec="vq", bits_per_weight=1.0, dequantize=dequantize))
            model.save_pretrained(folder)
        bpw = checkpoint_report(packed_dir)["bpw"]
        dense = partial(AutoModelForCausalLM.from_pretrained, dense_dir, dtype=torch.bfloat16)
        signlock = partial(AutoModelForCausalLM.from_pretrained, packed_dir, dtype=torch.bfloat16)
        compressed = partial(AutoModelForCausalLM.from_pretrained, compressed_dir)
        dense_load, signlock_load, load_ratio = paired_seconds(dense, signlock, repeats)
        _, compressed_load, compressed_load_ratio = paired_seconds(dense, compressed, repeats)
        ids = torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(0))
        one_token = ids[:1, :1]  # time to a first output: the dense load's mapped pages are read on first use
        with torch.no_grad():
            dense_first, signlock_first, first_ratio = paired_seconds(lambda: dense()(one_token),
                                                                      lambda: signlock()(one_token), repeats)
        dense_model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        compressed_model = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            dense_forward, compressed_forward, forward_ratio = paired_seconds(lambda: dense_model(ids),
                                                                              lambda: compressed_model(ids), repeats)
        return {
            "model": name, "bpw": bpw,
            "dense_bf16_bytes": checkpoint_bytes(dense_dir), "signlock_bytes": checkpoint_bytes(packed_dir),
            "dense_load_s": dense_load, "signlock_load_s": signlock_load,
            "dense_forward_s": dense_forward, "compressed_forward_s": compressed_forward,
            "compressed_load_s": compressed_load,
            "dense_first_output_s": dense_first, "signlock_first_output_s": signlock_first,
            "first_output_ratio": first_ratio,
            "load_ratio": load_ratio, "compressed_load_ratio": compressed_load_ratio,
            "size_ratio": checkpoint_bytes(packed_dir) / checkpoint_bytes(dense_dir),
            "forward_ratio": forward_ratio,
        }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    builds = {"synthetic llama 8x512": synthetic}
    if (ROOT / "runs" / "quickstart" / "signlock_stats.json").exists():
        builds = {"quickstart (4x128)": quickstart, **builds}
    results = [measure(name, build, args.repeats) for name, build in builds.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    lines = ["# SignLock checkpoint (vq, 1 bit per target weight) vs the same model dense in bf16\n",
             "Whole checkpoints: embeddings, norms and head stay dense in both, so size ratios are above bpw / 16. "
             "Files are in the page cache: the dense load maps them and touches no weight; the SignLock load checks "
             "and decodes every one. Each SignLock load is timed in alternation with a dense one; ratios are medians "
             "of the per-pair ratios.\n",
             "| model | bpw | load, dequantize on load (s) | dense bf16 load (s) | load ratio | load ratio, compressed "
             "modules (checked, not decoded) | load + first token, ratio | size ratio | forward, compressed modules / dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['bpw']:.3f} | {r['signlock_load_s']:.3f} | {r['dense_load_s']:.3f} | "
                     f"{r['load_ratio']:.2f} | {r['compressed_load_ratio']:.2f} | {r['first_output_ratio']:.2f} | "
                     f"{r['size_ratio']:.3f} | "
                     f"{r['forward_ratio']:.2f} |")
    (out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
