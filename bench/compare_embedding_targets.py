"""The token embedding and the LM head as training targets: what locking their signs costs, over several seeds.

Trains the quickstart recipe (gap init + outward drift) with three target sets, same data and steps, for each seed:

* ``blocks``: the block projections only (``target_embeddings: false``);
* ``+ embedding``: and the token embedding (the recipe's default);
* ``+ embedding + head``: and the untied LM head (``target_lm_head: true``).

Each run's flips are counted per kind from its final weights against the seeded signs (what an export codes), and
its held-out perplexity is the trainer's eval. Writes bench/results/embedding_targets.{json,md}:

    python bench/compare_embedding_targets.py                 # 9 runs, ~20 minutes on 2 CPU cores
    python bench/compare_embedding_targets.py --seeds 0 --reuse
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"
VARIANTS = {
    "blocks": ["--target_embeddings", "false"],
    "+ embedding": ["--target_embeddings", "true"],
    "+ embedding + head": ["--target_embeddings", "true", "--target_lm_head", "true"],
}


def train(folder: Path, seed: int, flags: list[str]) -> None:
    command = [sys.executable, "-m", "hf_signlock", "train", "--config", str(RECIPE), "--output_dir", str(folder),
               "--seed", str(seed), "--disable_tqdm", "true", *flags]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    (folder / "wall_s.txt").write_text(f"{time.perf_counter() - started:.1f}\n")


def flips_by_kind(folder: Path) -> dict:
    """Flips against the seeded signs of the embedding, the head and the projections of the run's final model."""
    from transformers import AutoModelForCausalLM

    from hf_signlock.signs import seeded_signs
    from hf_signlock.targets import find_target_modules

    stats = json.loads((folder / "signlock_stats.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    kinds = {"embedding": find_target_modules(model, None, embeddings=True, lm_head=False),
             "head": {"lm_head": model.lm_head}, "projections": find_target_modules(model)}
    found = {}
    for kind, modules in kinds.items():
        flips = weights = 0
        for name, module in modules.items():
            if kind == "embedding" and module is not model.get_input_embeddings():
                continue
            weight = module.weight.detach()
            reference = seeded_signs(stats["seed"], f"{name}.weight", weight.numel()).view(weight.shape)
            flips += int((reference * weight <= 0).sum())
            weights += weight.numel()
        found[kind] = {"flips": flips, "weights": weights, "flip_rate": flips / weights,
                       "target": any(t == f"{n}.weight" for t in stats["target_modules"] for n in modules)}
    return {"eval_perplexity": stats["eval_perplexity"], "flip_rate": stats["flip_rate"], "by_kind": found,
            "wall_s": float((folder / "wall_s.txt").read_text()) if (folder / "wall_s.txt").exists() else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-embeddings"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of training them")
    args = parser.parse_args(argv)

    results = {}
    for variant, flags in VARIANTS.items():
        for seed in args.seeds:
            folder = Path(args.runs) / f"{variant.replace(' ', '').replace('+', '_')}-seed{seed}"
            if not (args.reuse and (folder / "signlock_stats.json").exists()):
                train(folder, seed, flags)
            results.setdefault(variant, {})[seed] = flips_by_kind(folder)
    base = results["blocks"]
    summary = {}
    for variant, runs in results.items():
        ratios = [runs[s]["eval_perplexity"] / base[s]["eval_perplexity"] for s in args.seeds]
        summary[variant] = {
            "perplexity": [runs[s]["eval_perplexity"] for s in args.seeds],
            "perplexity_ratio_to_blocks": ratios,
            "mean_ratio": statistics.mean(ratios),
            "flip_rate_by_kind": {kind: [runs[s]["by_kind"][kind]["flip_rate"] for s in args.seeds]
                                  for kind in ("projections", "embedding", "head")},
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedding_targets.json").write_text(json.dumps({"seeds": args.seeds, "summary": summary,
                                                            "runs": results}, indent=2))
    rows = [("| targets | eval perplexity (per seed) | vs blocks (mean, per seed) | flip rate: projections | "
             "embedding | head |"), "|---|---|---|---|---|---|"]

    def cells(values, fmt):
        return " / ".join(format(v, fmt) for v in values)

    for variant, row in summary.items():
        flips = row["flip_rate_by_kind"]
        rows.append(f"| {variant} | {cells(row['perplexity'], '.2f')} | {row['mean_ratio']:.4f} "
                    f"({cells(row['perplexity_ratio_to_blocks'], '.4f')}) | {cells(flips['projections'], '.1e')} | "
                    f"{cells(flips['embedding'], '.1e')} | {cells(flips['head'], '.2e')} |")
    text = (f"# Embedding and head as training targets (quickstart recipe, seeds {args.seeds})\n\n" + "\n".join(rows)
            + "\n\nFlip rates are against the seeded signs, from each run's final weights. A kind that is not a "
            "target keeps its ordinary init: its 'flip rate' (about 0.5) is what export would pay for coded flips, "
            "so it stores those signs packed.\n")
    (out / "embedding_targets.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
