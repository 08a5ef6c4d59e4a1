"""One LoRA fine-tuning step on a compressed SignLock model vs the same step on the dense model: time and memory.

The model is a synthetic Llama with SmolLM2-135M's shapes and fewer layers (hidden 576, intermediate 1536, 9 heads /
3 kv heads, vocab 49152, tied embeddings; 8 layers), gap-initialised from a seed and exported with the vq codec at
1 bit per target weight (k-means cut to 3 iterations to keep the export short). Both variants load that checkpoint
in float32: "compressed" keeps ``SignLockLinear`` modules (``dequantize=False``), "dense" decodes them into
``nn.Linear`` on load, so the two compute the same function (their first-step losses are printed side by side).
Each gets the same LoRA adapters (rank 8, alpha 16, on all seven projections of every block) and runs steps of
forward + backward + AdamW on the adapters, batch 8 x 128 tokens.

Each variant runs in its own process (peak RSS is a process's high-water mark); the variants alternate over
``--rounds`` rounds so that machine drift hits both, and step times are pooled over the rounds. Reported: median step
time with min / max and the interquartile range, the compressed / dense ratio of medians, peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``), the RSS once the model is loaded with its adapters (before any step), the
RSS of the interpreter after imports for reference, and the model's own parameter + buffer bytes.

    python bench/bench_lora.py [--repeats 5] [--rounds 2]     # writes bench/results/lora.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from memory import MIB, peak_rss_mib, rss_mib
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging

from hf_signlock import SignLockConfig, apply_gap_init, checkpoint_report, get_lora_config, quantize_model

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
BATCH, BLOCK, RANK = 8, 128, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 9,
          "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True}


def export(folder: Path) -> dict:
    """The synthetic model, seeded gap init, compressed (vq, 1 bit per target weight) into ``folder``."""
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES))
    apply_gap_init(model, seed=SEED, gap=1.0)
    # 3 k-means iterations instead of 25: the codebook's quality does not change what a step costs (export ~8x faster)
    quantize_model(model, SignLockConfig(seed=SEED, codec="vq", codec_params={"iterations": 3}, bits_per_weight=1.0,
                                         dequantize=False))
    model.save_pretrained(folder)
    report = checkpoint_report(folder)
    return {"bpw": report["bpw"], "target_weights": report["total"]["weights"],
            "checkpoint_bytes": report["checkpoint"]["bytes"]}


def worker(variant: str, folder: str, repeats: int, warmup: int) -> dict:
    """Load ``folder`` as ``variant``, attach LoRA, time ``repeats`` training steps after ``warmup`` untimed ones."""
    rss_imports = rss_mib()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=SignLockConfig(dequantize=variant == "dense"))
    load_s = time.perf_counter() - start
    torch.manual_seed(SEED)  # the same adapter init in both variants
    start = time.perf_counter()
    model = get_peft_model(model, get_lora_config(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                                  target_modules=TARGETS))
    peft_s = time.perf_counter() - start
    model.train()
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, SHAPES["vocab_size"], (BATCH, BLOCK), generator=torch.Generator().manual_seed(SEED))
    rss_loaded = rss_mib()

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses, times = [], []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        losses.append(step())
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
        print(f"  {variant} step {i + 1}/{warmup + repeats}: {elapsed:.2f} s{' (warm-up)' if i < warmup else ''}",
              file=sys.stderr, flush=True)
    return {"variant": variant, "step_s": times, "first_loss": losses[0], "load_s": load_s, "get_peft_model_s": peft_s,
            "model_bytes": model_bytes, "trainable_params": sum(p.numel() for p in trainable),
            "rss_after_imports_mib": rss_imports, "rss_after_load_mib": rss_loaded, "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads()}


def run_worker(variant: str, folder: Path, repeats: int, warmup: int) -> dict:
    """``worker`` in a fresh interpreter (its peak RSS is its own); its result is the last line it prints."""
    command = [sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--repeats", str(repeats),
               "--warmup", str(warmup)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Pooled step times of one variant's runs, and the largest of their memory figures."""
    times = sorted(t for run in runs for t in run["step_s"])
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1], "q1_s": q1, "q3_s": q3,
            "steps": len(times), "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
            "rss_after_imports_mib": max(run["rss_after_imports_mib"] or 0 for run in runs),
            "rss_after_load_mib": max(run["rss_after_load_mib"] or 0 for run in runs),
            "model_bytes": runs[0]["model_bytes"], "trainable_params": runs[0]["trainable_params"],
            "first_loss": runs[0]["first_loss"], "load_s": statistics.median(run["load_s"] for run in runs),
            "get_peft_model_s": statistics.median(run["get_peft_model_s"] for run in runs), "runs": runs}


def markdown(results: dict) -> str:
    """The short table of ``results``."""
    dense, compressed = results["variants"]["dense"], results["variants"]["compressed"]
    model = results["model"]
    lines = [
        "# One LoRA training step: compressed SignLock model vs dense\n",
        (f"Synthetic Llama with SmolLM2-135M shapes, {SHAPES['num_hidden_layers']} layers "
         f"({model['target_weights'] / 1e6:.1f} M target weights, vq at {model['bpw']:.3f} bits per weight), float32 "
         f"on CPU ({results['machine']['threads']} threads). LoRA rank {RANK} on all seven projections; one step = "
         f"forward + backward + AdamW on the adapters, batch {BATCH} x {BLOCK} tokens; "
         f"{dense['steps']} timed steps per variant over {results['rounds']} alternating rounds, one process each. "
         f"RSS figures include the interpreter with torch, transformers and peft imported "
         f"(~{dense['rss_after_imports_mib']:.0f} MiB); the peak adds a step's activations, the same in both "
         f"(the {SHAPES['vocab_size']}-way logits of {BATCH * BLOCK} tokens alone are "
         f"{BATCH * BLOCK * SHAPES['vocab_size'] * 4 / MIB:.0f} MiB per copy). First-step loss: dense "
         f"{dense['first_loss']:.5f}, compressed {compressed['first_loss']:.5f}.\n"),
        ("| variant | median step (s) | spread: min - max (IQR) (s) | ratio to dense | peak RSS (MiB) | RSS loaded, "
         "before a step (MiB) | model bytes (params + buffers) |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in (("dense (nn.Linear)", dense), ("compressed (SignLockLinear)", compressed)):
        lines.append(f"| {name} | {v['median_s']:.2f} | {v['min_s']:.2f} - {v['max_s']:.2f} "
                     f"({v['q1_s']:.2f} - {v['q3_s']:.2f}) | {v['median_s'] / dense['median_s']:.2f} | "
                     f"{v['peak_rss_mib']:.0f} | {v['rss_after_load_mib']:.0f} | {v['model_bytes'] / MIB:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--worker", choices=["dense", "compressed"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if args.worker:
        warnings.filterwarnings("ignore", message=".*quantization_config.*already has")  # the loading attribute: meant
        warnings.filterwarnings("ignore", category=FutureWarning)
        print(json.dumps(worker(args.worker, args.folder, args.repeats, args.warmup)))
        return
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "signlock")
        print("exporting the synthetic model (vq, 1 bit per weight) ...", flush=True)
        model_info = export(folder)
        print(f"  {model_info['bpw']:.3f} bpw, {model_info['checkpoint_bytes'] / MIB:.1f} MiB checkpoint, "
              f"{time.perf_counter() - began:.0f} s", flush=True)
        runs = {"dense": [], "compressed": []}
        for round_ in range(args.rounds):
            for variant in ("dense", "compressed") if round_ % 2 == 0 else ("compressed", "dense"):
                print(f"round {round_ + 1}/{args.rounds}: {variant} ...", flush=True)
                runs[variant].append(run_worker(variant, folder, args.repeats, args.warmup))
    variants = {name: summarise(name_runs) for name, name_runs in runs.items()}
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": variants["dense"]["runs"][0]["threads"], "torch": torch.__version__,
                    "python": platform.python_version()},
        "model": {**model_info, "config": SHAPES, "dtype": "float32"},
        "lora": {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": TARGETS, "batch": BATCH, "block": BLOCK,
                 "optimizer": "AdamW(lr=1e-4)"},
        "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
        "variants": variants,
        "ratio": variants["compressed"]["median_s"] / variants["dense"]["median_s"],
        "peak_rss_ratio": variants["compressed"]["peak_rss_mib"] / variants["dense"]["peak_rss_mib"],
        "wall_s": time.perf_counter() - began,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "lora.md").write_text(table)
    print(table)
    print(f"total {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
