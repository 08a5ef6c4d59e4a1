"""Time of ``import hf_signlock`` vs ``import transformers`` alone, and what each import pulls in.

Each import runs in a fresh interpreter, the variants in alternation (ratios are medians of per-pair ratios, so a
slow spell hits both sides of a pair). Also timed: loading transformers' model classes and quantizer registry
(what the first ``from_pretrained`` imports anyway) with and without hf_signlock.

    python bench/bench_import.py [--repeats 9]     # writes bench/results/import.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "import transformers": "import transformers",
    "import hf_signlock": "import hf_signlock",
    "from transformers import AutoModelForCausalLM (+ registry)":
        "from transformers import AutoModelForCausalLM; import transformers.modeling_utils",
    "import hf_signlock, then the same": "import hf_signlock; from transformers import AutoModelForCausalLM; "
                                         "import transformers.modeling_utils",
}
WATCHED = ("accelerate", "datasets", "transformers.trainer", "hf_signlock.training", "peft", "numba")


def timed(code: str) -> tuple[float, list[str]]:
    """Seconds of ``code`` in a fresh interpreter (interpreter start excluded), and the watched modules it loaded."""
    script = ("import time, sys; t = time.perf_counter()\n" + code + "\n"
              "print(time.perf_counter() - t); print(sorted({m.split('.')[0] if not m.startswith(('hf_signlock.',"
              "'transformers.')) else '.'.join(m.split('.')[:2]) for m in sys.modules if m.startswith("
              f"{WATCHED!r})}}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    seconds, modules = out.strip().splitlines()[-2:]
    return float(seconds), eval(modules)  # a list literal printed by the child


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    times = {name: [] for name in VARIANTS}
    loaded = {}
    for repeat in range(args.repeats + 1):  # the first round warms the page cache and numba's, not counted
        for name, code in VARIANTS.items():
            seconds, modules = timed(code)
            loaded[name] = modules
            if repeat:
                times[name].append(seconds)
        print(f"round {repeat}/{args.repeats}", flush=True)
    names = list(VARIANTS)
    ratios = {
        "hf_signlock / transformers": [b / a for a, b in zip(times[names[0]], times[names[1]])],
        "registry with hf_signlock / without": [b / a for a, b in zip(times[names[2]], times[names[3]])],
    }
    summary = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "loads": loaded[name]}
               for name, t in times.items()}
    result = {"repeats": args.repeats, "variants": summary,
              "ratios": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in ratios.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "import.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Import time, fresh interpreter, {args.repeats} alternating rounds\n",
             "| what | median s | min-max s | loads (of accelerate, datasets, Trainer, hf_signlock.training, peft, "
             "numba) |", "|---|---:|---:|---|"]
    for name, row in summary.items():
        lines.append(f"| `{name}` | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | "
                     f"{', '.join(row['loads']) or 'none'} |")
    lines += ["", "| ratio (per-pair) | median | min-max |", "|---|---:|---:|"]
    for name, row in result["ratios"].items():
        lines.append(f"| {name} | {row['median']:.2f} | {row['min']:.2f}-{row['max']:.2f} |")
    (out / "import.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
