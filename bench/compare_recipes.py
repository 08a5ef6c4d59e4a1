"""Quickstart (gap init + outward drift) vs baseline (ordinary init, no drift): same seed, data and steps, one run.

Trains both recipes (or reads finished runs with --reuse), then writes bench/results/recipes.{json,md} and a plot of
the flip rate over training (recipes.png, if matplotlib is installed):

    python bench/compare_recipes.py                 # ~8 minutes on 2 CPU cores
    python bench/compare_recipes.py --max_steps 100 # a quicker look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"quickstart": ROOT / "recipes" / "quickstart.yaml", "baseline": ROOT / "recipes" / "baseline.yaml"}


def train(name: str, output_dir: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "hf_signlock", "train", "--config", str(RECIPES[name]),
               "--output_dir", str(output_dir), "--disable_tqdm", "true", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    stats = json.loads((output_dir / "signlock_stats.json").read_text())
    stats["wall_s"] = time.perf_counter() - started
    (output_dir / "wall_s.txt").write_text(f"{stats['wall_s']:.1f}\n")
    return stats


def load(output_dir: Path) -> dict:
    stats = json.loads((output_dir / "signlock_stats.json").read_text())
    wall = output_dir / "wall_s.txt"
    stats["wall_s"] = float(wall.read_text()) if wall.exists() else None
    return stats


def plot(runs: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, stats in runs.items():
        steps = [h["step"] for h in stats["history"]]
        axis.plot(steps, [max(h["flip_rate"], 1e-7) for h in stats["history"]], label=name)
    axis.set_yscale("log")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("flip rate vs. initial signs")
    axis.axhline(1e-3, color="grey", linestyle=":", linewidth=1)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench"), help="where the two runs are written")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of training")
    args, extra = parser.parse_known_args(argv)

    runs = {}
    for name in RECIPES:
        folder = Path(args.runs) / name
        runs[name] = load(folder) if args.reuse else train(name, folder, extra)
    quick, base = runs["quickstart"], runs["baseline"]
    summary = {
        "flip_rate": {n: r["flip_rate"] for n, r in runs.items()},
        "flips": {n: r["flips"] for n, r in runs.items()},
        "target_weights": quick["target_weights"],
        "flip_rate_reduction": base["flip_rate"] / max(quick["flip_rate"], 1 / quick["target_weights"]),
        "eval_perplexity": {n: r["eval_perplexity"] for n, r in runs.items()},
        "perplexity_ratio": quick["eval_perplexity"] / base["eval_perplexity"],
        "geometric_tail_ratio": {n: r["geometric_tail_ratio"] for n, r in runs.items()},
        "crossing_histogram": {n: r["crossing_histogram"][:12] for n, r in runs.items()},
        "wall_s": {n: r["wall_s"] for n, r in runs.items()},
        "steps": quick["global_step"],
        "extra_flags": extra,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.json").write_text(json.dumps(summary, indent=2))
    rows = ["| recipe | flip rate | flips | eval perplexity | tail ratio | wall (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        tail = "-" if r["geometric_tail_ratio"] is None else f"{r['geometric_tail_ratio']:.3f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        rows.append(f"| {name} | {r['flip_rate']:.3g} | {r['flips']} | {r['eval_perplexity']:.3f} | {tail} | {wall} |")
    text = (
        f"# Quickstart vs baseline ({summary['steps']} steps, {summary['target_weights']} target weights)\n\n"
        + "\n".join(rows)
        + f"\n\nflip rate reduction: {summary['flip_rate_reduction']:.0f}x (flips floored at 1 for the ratio); "
        f"perplexity ratio quickstart / baseline: {summary['perplexity_ratio']:.4f}\n"
    )
    (out / "recipes.md").write_text(text)
    plot(runs, out / "recipes.png")
    print(text)


if __name__ == "__main__":
    main()
