"""Compressing a real pretrained LM: SmolLM2-135M (and a fine-tune of it) at several total bits, in one run.

The comparison with the tools users pick instead (llama.cpp, HQQ, llm-compressor's GPTQ, bitsandbytes) is
``bench/peers/``, each tool from its own package; this bench follows the product's own path in detail. Rows, all on
the 210 q/k/v/o/gate/up/down projections, all from the same calibration windows (64 x 256 tokens of the built-in
corpus' training split, ``CalibrationArguments()``, the export's default) and the same Hessians:

- ``signlock packed``: ``hf-signlock export``'s path: 1-bit packed signs + the ``signmag`` codec, calibrated.
- ``signlock base``: the fine-tune, its signs stored as flips against the base model's (``sign_source="base"``).

Total bits per target weight: ``bpw.json`` of the written checkpoint, every byte counted (headers, records, levels,
bias). Held-out text: the first ``--tokens`` tokens of the corpus' held-out split (never calibration text), sliding
windows of 256 with stride 128. Perplexity is taken after ``from_pretrained`` of the written export (the round trip
is part of the measurement).

Also timed: the export itself through ``export_run`` (calibration + coding + save, and refinement when
``--refine-steps``), and ``from_pretrained`` of the export against that of the dense folder (alternated, medians):
loaded again and again in this process, and loaded once in each of several new processes, as a script loads it.

    python bench/bench_real_export.py [--finetune runs/smollm2-ft] [--budgets 2.5,3.25,4.25]
    # writes bench/results/real_export.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import paired_seconds
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from hf_signlock import SignLockConfig, quantize_model
from hf_signlock.evaluation.perplexity import sliding_window_perplexity
from hf_signlock.quantization.bits import write_bits_report
from hf_signlock.quantization.calibration import CalibrationArguments, calibration_windows, collect_hessians
from hf_signlock.quantization.export import export_run
from hf_signlock.targets import find_target_modules
from hf_signlock.text import resolve_eval_text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from get_smollm2 import smollm2_folder


def log(message: str) -> None:
    print(message, flush=True)


def perplexity(model, ids) -> float:
    with torch.no_grad():
        return sliding_window_perplexity(model, ids, window=256, stride=128)["perplexity"]


def signlock_row(folder, budget: float, hessians, ids, out: Path) -> dict:
    """Our codec through quantize_model with the shared Hessians, saved, counted and loaded back."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = time.perf_counter()
    quantize_model(model, SignLockConfig(sign_source="packed", codec="signmag", bits_per_weight=budget), hessians)
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    report = write_bits_report(out)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    params = sorted({(r["codec_params"]["bits"], r["codec_params"]["group"])
                     for r in loaded_records(model)})
    return {"method": "signlock packed", "budget": budget, "bpw": report["bpw"], "perplexity": perplexity(loaded, ids),
            "seconds": round(seconds, 1), "codes": ", ".join(f"{b}-bit g{g}" for b, g in params)}


def loaded_records(model):
    return [m.record for m in model.modules() if hasattr(m, "record") and hasattr(m, "codec_params")]


def own_base(folder, kwargs: dict) -> dict:
    """Loading arguments for an export stored against a base: the bench names the base it exported against (an
    export's own config is not followed out of its folder), keeping a ``dequantize`` choice in ``kwargs``."""
    quantization = json.loads(Path(folder, "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("sign_source") != "base":
        return kwargs
    config = kwargs.get("quantization_config") or SignLockConfig()
    config.base_model = quantization["base_model"]
    return {**kwargs, "quantization_config": config}


def timed_export(run_dir, out: Path, budget: float, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    report = export_run(run_dir, out, bits_per_weight=budget, overwrite=True, **kwargs)
    return report, time.perf_counter() - start


# One load in a new process, as a user's script does it: the libraries (hf_signlock too, which helps the dense side)
# are imported before the clock starts; numba's kernels load inside it.
_FRESH_LOAD = """
import json, sys, time, torch
import hf_signlock
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar()
torch.set_num_threads(2)
start = time.perf_counter()
quantization = json.load(open(sys.argv[1] + "/config.json")).get("quantization_config") or {}
kwargs = ({"quantization_config": hf_signlock.SignLockConfig(base_model=quantization["base_model"])}
          if quantization.get("sign_source") == "base" else {})  # the bench names the base it exported against
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
loaded = time.perf_counter() - start
with torch.no_grad():
    model(torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0)))
print(json.dumps({"load": loaded, "load_and_forward": time.perf_counter() - start}))
"""


def fresh_process_ratio(export: Path, dense: Path, repeats: int) -> dict:
    """The first ``from_pretrained`` of a process (and it plus one forward), export vs dense folder, each in a new
    Python process, alternated: medians of the seconds and of the per-pair ratios."""
    def run(folder):
        out = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(folder)], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    pairs = [(run(dense), run(export)) for _ in range(repeats)]
    return {key: {"dense_s": round(statistics.median(d[key] for d, _ in pairs), 3),
                  "export_s": round(statistics.median(e[key] for _, e in pairs), 3),
                  "ratio": round(statistics.median(e[key] / d[key] for d, e in pairs), 2)}
            for key in ("load", "load_and_forward")}


def load_ratio(export: Path, dense: Path, repeats: int) -> dict:
    """Loads of the export against the dense folder: repeated, each kind in its own new process
    (``repeated_loads``: a process that has freed much memory before reuses it and faults in fewer fresh pages,
    which flattered the export by up to ~1.3x dense here), and the first load of each of several new processes."""
    result = {}
    for kind in LOAD_KINDS:
        out = subprocess.run([sys.executable, __file__, "--repeated-loads", str(export), str(dense), kind,
                              "--load-repeats", str(repeats)], capture_output=True, text=True, check=True)
        result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    for key, value in fresh_process_ratio(export, dense, repeats).items():
        result[f"fresh_process_{key}"] = value
    return result


LOAD_KINDS = ("load", "load_and_forward", "load_compressed", "dense_in_memory")


def repeated_loads(export: Path, dense: Path, kind: str, repeats: int) -> dict:
    """``from_pretrained`` of the export vs the dense folder (alternated), one of three ways: the default load (dense
    modules: every layer checked and decoded), the same followed by one forward pass of 128 tokens (the dense
    folder is memory-mapped, so its weights are only read when first used: this counts that), and the export kept
    compressed (``dequantize=False``: checked, decoded in each forward). Beside them, the dense folder loaded and
    its target weights copied into the process's own memory: no checking, no decoding, only the fresh pages that
    any load holding dense modules must write, the least such a load can cost against a memory map."""
    prompt = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))

    def load(folder, forward=False, **kwargs):
        def run():
            model = AutoModelForCausalLM.from_pretrained(folder, **own_base(folder, kwargs))
            if forward:
                with torch.no_grad():
                    model(prompt)
        return run

    def dense_in_memory():
        model = AutoModelForCausalLM.from_pretrained(dense)
        for module in find_target_modules(model).values():
            module.weight.data = module.weight.detach().clone()

    timed = {"load": load(export), "load_and_forward": load(export, forward=True), "dense_in_memory": dense_in_memory,
             "load_compressed": load(export, quantization_config=SignLockConfig(dequantize=False))}[kind]
    dense_s, export_s, ratio = paired_seconds(load(dense, forward=kind == "load_and_forward"), timed, repeats)
    return {"dense_s": round(dense_s, 3), "export_s": round(export_s, 3), "ratio": round(ratio, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="2.5,3.25,4.25")
    parser.add_argument("--finetune", default=str(ROOT / "runs" / "smollm2-ft"),
                        help="a captured fine-tune of SmolLM2 (recipes/finetune_smollm2.yaml); skipped if missing")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--refine-steps", type=int, default=0, help="also time an export refined for N steps")
    parser.add_argument("--load-repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_export"))
    parser.add_argument("--repeated-loads", nargs=3, metavar=("EXPORT", "DENSE", "KIND"),
                        help=f"only time repeated loads of EXPORT against DENSE, KIND one of {LOAD_KINDS} (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.disable_progress_bar()
    if args.repeated_loads:
        export, dense, kind = args.repeated_loads
        print(json.dumps(repeated_loads(Path(export), Path(dense), kind, args.load_repeats)))
        return
    began = time.perf_counter()
    folder = smollm2_folder()
    budgets = [float(b) for b in args.budgets.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held_out = resolve_eval_text(tokenizer, None, model_source=str(folder), split="validation", max_tokens=args.tokens)
    log(f"held-out: {held_out.description}")
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = [{"method": "dense", "budget": None, "bpw": 32.0, "perplexity": perplexity(dense, held_out.input_ids)}]
    log(f"dense: {rows[0]['perplexity']:.3f}")
    calibration = CalibrationArguments()
    start = time.perf_counter()
    windows = calibration_windows(tokenizer, calibration, folder)
    hessians = collect_hessians(dense, windows, find_target_modules(dense))
    hessian_s = time.perf_counter() - start
    del dense
    log(f"calibration: {tuple(windows.shape)} tokens, Hessians in {hessian_s:.0f} s")
    work = Path(tempfile.mkdtemp(prefix="real_export_"))
    for budget in budgets:
        rows.append(signlock_row(folder, budget, hessians, held_out.input_ids, work / f"packed-{budget}"))
        log(f"  {rows[-1]}")
    del hessians

    # The product's own path, timed end to end (calibration included), and its load time.
    headline = 3.25 if 3.25 in budgets else budgets[0]
    report, export_s = timed_export(folder, work / "export", headline)
    timings = {"export_budget": headline, "export_s": round(export_s, 1), "export_bpw": report["bpw"],
               "load": load_ratio(work / "export", Path(folder), args.load_repeats)}
    log(f"export_run at {headline}: {export_s:.0f} s; load {timings['load']}")
    if args.refine_steps:
        report, refine_s = timed_export(folder, work / "refined", headline, refine_steps=args.refine_steps,
                                        refine_loss="teacher")
        refined = AutoModelForCausalLM.from_pretrained(work / "refined").eval()
        rows.append({"method": f"signlock packed + refine {args.refine_steps}", "budget": headline,
                     "bpw": report["bpw"], "perplexity": perplexity(refined, held_out.input_ids),
                     "seconds": round(refine_s, 1)})
        timings["refined_export_s"] = round(refine_s, 1)
        log(f"  {rows[-1]}")

    finetune = Path(args.finetune)
    if (finetune / "config.json").exists():
        tuned = AutoModelForCausalLM.from_pretrained(finetune, dtype=torch.float32).eval()
        rows.append({"method": "fine-tune dense", "budget": None, "bpw": 32.0,
                     "perplexity": perplexity(tuned, held_out.input_ids)})
        del tuned
        for sign_source, budget in (("packed", headline), ("base", round(headline - 0.95, 2))):
            report, seconds = timed_export(finetune, work / f"ft-{sign_source}", budget, sign_source=sign_source)
            loaded = AutoModelForCausalLM.from_pretrained(work / f"ft-{sign_source}").eval()
            rows.append({"method": f"fine-tune signlock {sign_source}", "budget": budget, "bpw": report["bpw"],
                         "perplexity": perplexity(loaded, held_out.input_ids), "seconds": round(seconds, 1),
                         "sign_bits": report["total"]["sign_bits"] / report["total"]["weights"],
                         "flips": report["total"].get("flips")})
            log(f"  {rows[-1]}")
        timings["finetune_base_load"] = load_ratio(work / "ft-base", finetune, args.load_repeats)
    else:
        log(f"no fine-tune at {finetune}: its rows are skipped")

    dense_ppl = rows[0]["perplexity"]
    for row in rows:
        row["ratio"] = row["perplexity"] / dense_ppl
    result = {"model": "SmolLM2-135M-Instruct (scripts/get_smollm2.py)", "held_out": held_out.description,
              "calibration": {**calibration.describe(), "hessian_s": round(hessian_s, 1)}, "rows": rows,
              "timings": timings, "threads": torch.get_num_threads(), "machine": platform.platform(),
              "total_s": round(time.perf_counter() - began, 1)}
    write(result, Path(args.out))


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    timings = result["timings"]
    lines = ["# SmolLM2-135M through hf-signlock's export (the peers' tools: bench/peers)", "",
             (f"Held-out: {result['held_out']} (window 256, stride 128). Calibration, the same for every row: "
             f"{result['calibration']['samples']} x {result['calibration']['sequence_length']} tokens of "
             f"{result['calibration']['dataset']}, {result['calibration']['split']} split. bpw: total bits per "
             "target weight, every byte of the written checkpoint."), "",
             "| method | budget | bpw | perplexity | x dense | codes | seconds |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['budget'] or ''} | {r['bpw']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['ratio']:.3f} | {r.get('codes', '')} | {r.get('seconds', '')} |")
    lines += ["", f"`export_run` of SmolLM2-135M at {timings['export_budget']} bpw (calibration, coding, save): "
              f"{timings['export_s']} s on {result['threads']} threads"
              + (f"; with refinement {timings['refined_export_s']} s" if "refined_export_s" in timings else "")
              + ".", "", ("Loading, export vs dense folder (median seconds of alternated loads, median of the "
              "paired ratios; repeated loads in one clean process, first loads in new processes):"), "", "| export | load | export s | dense s | x dense |", "|---|---|---|---|---|"]
    for export, key in (("SmolLM2-135M packed", "load"), ("fine-tune, signs against the base", "finetune_base_load")):
        for kind, label in (("load", "`from_pretrained`"), ("load_and_forward", "`from_pretrained` + one forward"),
                            ("load_compressed", "`from_pretrained(..., dequantize=False)`"),
                            ("fresh_process_load", "first `from_pretrained` of a new process"),
                            ("fresh_process_load_and_forward", "first `from_pretrained` of a new process + one forward")):
            if key in timings:
                t = timings[key][kind]
                lines.append(f"| {export} | {label} | {t['export_s']} | {t['dense_s']} | {t['ratio']} |")
    for folder, key in (("SmolLM2-135M", "load"), ("fine-tune", "finetune_base_load")):
        if key in timings and "dense_in_memory" in timings[key]:
            t = timings[key]["dense_in_memory"]
            lines.append(f"| {folder} dense folder, target weights copied into memory (no checks, no decoding) | "
                         f"`from_pretrained` + copy | {t['export_s']} | {t['dense_s']} | {t['ratio']} |")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(result, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = result["rows"]
    for method, marker in (("signlock packed", "o"), ("fine-tune signlock packed", "D"), ("fine-tune signlock base", "*")):
        points = sorted((r["bpw"], r["perplexity"]) for r in rows if r["method"] == method)
        if points:
            ax.plot(*zip(*points), marker=marker, label=method)
    for r in rows:
        if r["method"].startswith("signlock packed + refine"):
            ax.plot([r["bpw"]], [r["perplexity"]], marker="P", linestyle="none", label=r["method"])
    for method, style in (("dense", "--"), ("fine-tune dense", ":")):
        for r in rows:
            if r["method"] == method:
                ax.axhline(r["perplexity"], linestyle=style, color="grey", label=f"{method} (fp32)")
    ax.set_xlabel("total bits per target weight")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity vs total bits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
