"""The whole file a user downloads: perplexity against bits per parameter of every byte, embeddings and head included.

Two models, one run (``--only`` picks one; the other's rows are kept from the last run):

- ``quickstart``: the quickstart recipe's model (token embedding trained as a target; its untied head not, so export
  stores the head's signs packed) and the same recipe with the head trained as a target too
  (``--target_lm_head true``: no sign bits for the head, a worse dense model). Each is exported with
  ``hf-signlock export --bits_per_parameter B --refine_steps N --refine_loss teacher`` (vq, signs from the seed) for
  B in ``--quickstart-budgets``, and evaluated on the run's held-out split.
- ``smollm2``: SmolLM2-135M (packed signs; ``signmag``, calibrated; the tied embedding coded with the head's
  Hessian) at ``--smollm2-budgets`` bits per parameter, and a fine-tune of it (``recipes/finetune_smollm2.yaml``)
  exported with packed signs and with its signs stored against the base, at the budgets ``--finetune-budgets``;
  held-out: the first ``--tokens`` tokens of the built-in corpus' held-out split (windows of 256, stride 128).

Every perplexity is measured after ``from_pretrained`` of the written export in float32 (the file's bf16 norms are
exact in it), against the dense model in float32; bits per parameter are ``hf-signlock inspect``'s, counted from the
files (weight files and config). Writes bench/results/whole_file.{json,md,png}:

    python bench/bench_whole_file.py                       # trains what is missing; ~40 minutes on 2 CPU cores
    python bench/bench_whole_file.py --only quickstart     # ~15 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

import hf_signlock  # noqa: F401 (registers the quantizer)
from hf_signlock import SignLockConfig
from hf_signlock.evaluation.perplexity import evaluate_model, sliding_window_perplexity
from hf_signlock.quantization.export import export_run
from hf_signlock.text import resolve_eval_text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from get_smollm2 import smollm2_folder

RUNS = ROOT / "runs"
QUICKSTART = {"quickstart": [], "quickstart, head a target": ["--target_lm_head", "true"]}


def log(message: str) -> None:
    print(message, flush=True)


def train(recipe: str, output_dir: Path, extra: list[str]) -> None:
    if (output_dir / "signlock_stats.json").exists():
        return
    log(f"training {recipe} {' '.join(extra)} -> {output_dir}")
    subprocess.run([sys.executable, "-m", "hf_signlock", "train", "--config", str(ROOT / "recipes" / recipe),
                    "--output_dir", str(output_dir), "--disable_tqdm", "true", *extra], check=True)


def timed_export(run: Path, out: Path, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    report = export_run(run, out, overwrite=True, **kwargs)
    return report, time.perf_counter() - start


def row(model: str, method: str, folder: Path, report: dict | None, perplexity: float, dense: float, **extra) -> dict:
    checkpoint = report["checkpoint"] if report else None
    return {"model": model, "method": method, "perplexity": perplexity, "ratio": perplexity / dense,
            "bits_per_parameter": checkpoint["bits_per_parameter"] if report else extra.pop("bits_per_parameter"),
            "bytes": checkpoint["bytes"] if report else extra.pop("bytes"),
            "bpw_targets": report["bpw"] if report else None,
            "bytes_by_part": checkpoint.get("bytes_by_part") if report else None, "folder": str(folder), **extra}


def quickstart_rows(budgets: list[float], refine_steps: int, work: Path) -> list[dict]:
    rows = []
    for name, extra in QUICKSTART.items():
        run = RUNS / ("quickstart" if not extra else "quickstart-head")
        train("quickstart.yaml", run, extra)
        tokenizer = AutoTokenizer.from_pretrained(run)
        dense_model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
        dense = evaluate_model(dense_model, tokenizer=tokenizer)["perplexity"]
        parameters = sum(p.numel() for p in dense_model.parameters())
        rows.append(row(name, "dense (bf16 file)", run, None, dense, dense, bits_per_parameter=16.0,
                        bytes=2 * parameters))
        log(f"{name}: dense {dense:.3f}")
        for budget in budgets:
            out = work / f"{run.name}-{budget}"
            report, seconds = timed_export(run, out, codec="vq", bits_per_parameter=budget,
                                           refine_steps=refine_steps, refine_loss="teacher")
            loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            perplexity = evaluate_model(loaded, tokenizer=tokenizer)["perplexity"]
            packed = [n for n, layer in report["layers"].items() if layer["signs"] == "packed"]
            rows.append(row(name, f"vq, {refine_steps} refinement steps", out, report, perplexity, dense,
                            budget=budget, export_s=round(seconds, 1), packed_layers=packed))
            log(f"  {rows[-1]['bits_per_parameter']:.3f} bpp: {perplexity:.3f} ({rows[-1]['ratio']:.3f}x)")
    return rows


def smollm2_rows(budgets: list[float], finetune_budgets: list[float], tokens: int, work: Path) -> list[dict]:
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held_out = resolve_eval_text(tokenizer, None, model_source=str(folder), split="validation", max_tokens=tokens)

    def perplexity(model) -> float:
        with torch.no_grad():
            return sliding_window_perplexity(model.eval(), held_out.input_ids, window=256, stride=128)["perplexity"]

    rows = []
    dense_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dense = perplexity(dense_model)
    parameters = sum(p.numel() for p in dense_model.parameters())
    del dense_model
    rows.append(row("SmolLM2-135M", "dense (bf16 file)", folder, None, dense, dense, bits_per_parameter=16.0,
                    bytes=2 * parameters))
    log(f"SmolLM2-135M: dense {dense:.3f} on {held_out.description}")
    for budget in budgets:
        out = work / f"smollm2-{budget}"
        report, seconds = timed_export(folder, out, bits_per_parameter=budget)
        ppl = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
        rows.append(row("SmolLM2-135M", f"packed signs, {report['codec']}", out, report, ppl, dense, budget=budget,
                        export_s=round(seconds, 1)))
        log(f"  {rows[-1]['bits_per_parameter']:.3f} bpp: {ppl:.3f} ({rows[-1]['ratio']:.3f}x)")
    finetune = RUNS / "smollm2-ft"
    train("finetune_smollm2.yaml", finetune, [])
    tuned = AutoModelForCausalLM.from_pretrained(finetune, dtype=torch.float32)
    tuned_dense = perplexity(tuned)
    stats = json.loads((finetune / "signlock_stats.json").read_text())
    del tuned
    rows.append(row("SmolLM2-135M fine-tune", "dense (bf16 file)", finetune, None, tuned_dense, tuned_dense,
                    bits_per_parameter=16.0, bytes=2 * parameters, flip_rate=stats["flip_rate"]))
    for sign_source, budget in finetune_budgets:
        out = work / f"ft-{sign_source}-{budget}"
        report, seconds = timed_export(finetune, out, bits_per_parameter=budget, sign_source=sign_source)
        given = {"quantization_config": SignLockConfig(base_model=str(folder))} if sign_source == "base" else {}
        ppl = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **given))
        rows.append(row("SmolLM2-135M fine-tune", f"{'signs against the base' if sign_source == 'base' else 'packed signs'}"
                        f", {report['codec']}", out, report, ppl, tuned_dense, budget=budget,
                        export_s=round(seconds, 1), flips=report["total"]["flips"],
                        sign_bits_per_weight=report["total"]["sign_bits"] / report["total"]["weights"]))
        log(f"  fine-tune {sign_source}: {rows[-1]['bits_per_parameter']:.3f} bpp: {ppl:.3f}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["quickstart", "smollm2"], default=None)
    parser.add_argument("--quickstart-budgets", default="2.0,1.5,1.25,1.0,0.75,0.5")
    parser.add_argument("--refine-steps", type=int, default=200)
    parser.add_argument("--smollm2-budgets", default="3.5,4.0,4.5")
    parser.add_argument("--finetune-budgets", default="packed:4.0,base:3.1,base:3.0",
                        help="SIGN_SOURCE:BITS_PER_PARAMETER of the fine-tune's exports")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "whole_file"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.disable_progress_bar()
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    result = {"machine": platform.platform(), "threads": torch.get_num_threads(), "parts": previous.get("parts", {})}
    work = Path(tempfile.mkdtemp(prefix="whole_file_"))
    if args.only in (None, "quickstart"):
        start = time.perf_counter()
        budgets = [float(b) for b in args.quickstart_budgets.split(",")]
        result["parts"]["quickstart"] = {"rows": quickstart_rows(budgets, args.refine_steps, work),
                                         "refine_steps": args.refine_steps,
                                         "seconds": round(time.perf_counter() - start, 1)}
    if args.only in (None, "smollm2"):
        start = time.perf_counter()
        finetune = [(s.split(":")[0], float(s.split(":")[1])) for s in args.finetune_budgets.split(",")]
        rows = smollm2_rows([float(b) for b in args.smollm2_budgets.split(",")], finetune, args.tokens, work)
        result["parts"]["smollm2"] = {"rows": rows, "tokens": args.tokens, "seconds": round(time.perf_counter() - start, 1)}
    write(result, out)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# The whole file: perplexity against bits per parameter", "",
             ("Bits per parameter: every byte of the weight files and config over the model's parameters (tied "
              "weights once). Perplexity after `from_pretrained` of the written export, in float32; `x dense` against "
              "the same model dense."), "",
             ("| model | method | bits per parameter | bytes | perplexity | x dense | bits per target weight | "
              "largest parts (bytes) |"), "|---|---|---|---|---|---|---|---|"]
    for part in result["parts"].values():
        for r in part["rows"]:
            parts = r.get("bytes_by_part") or {}
            largest = "; ".join(f"{k} {v:,.0f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
            target = "" if r["bpw_targets"] is None else f"{r['bpw_targets']:.3f}"
            lines.append(f"| {r['model']} | {r['method']} | {r['bits_per_parameter']:.3f} | {r['bytes']:,} | "
                         f"{r['perplexity']:.3f} | {r['ratio']:.3f} | {target} | {largest} |")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(result, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("quickstart", "smollm2") if p in result["parts"]]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
    for axis, part in zip(axes[0], parts):
        rows = result["parts"][part]["rows"]
        for model in dict.fromkeys(r["model"] for r in rows):
            for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
                points = sorted((r["bits_per_parameter"], r["perplexity"]) for r in rows
                                if r["model"] == model and r["method"] == method)
                if method.startswith("dense"):
                    axis.axhline(points[0][1], linestyle=":", color="grey", linewidth=1)
                    axis.annotate(f"{model} dense", (axis.get_xlim()[0], points[0][1]), fontsize=7)
                    continue
                axis.plot(*zip(*points), marker="o", label=f"{model}: {method}")
        axis.set_xlabel("bits per parameter, whole file")
        axis.set_ylabel("held-out perplexity")
        axis.set_title(part)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
