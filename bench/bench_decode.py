"""Running compressed: generation and prefill speed, memory and quality of SignLock models against dense, one run.

Rows (2 threads, every model loaded in a fresh process, rounds interleaved so that a slow moment of the machine hits
every row alike):

- SmolLM2-135M dense float32 and dense bf16 (transformers' own ``nn.Linear``);
- SmolLM2-135M exports, the whole model (embedding and tied head too) with calibrated ``signmag``: about 2.3 bits per
  target weight (the fine-tune ``runs/smollm2-ft`` stored against its base), 3.25 and 4.25 (packed signs); each
  loaded as ``from_pretrained`` gives it (compressed: the kernels of ``hf_signlock.kernels``) and dequantized
  (``SignLockConfig(dequantize=True)``: dense bf16 modules);
- the quickstart model (``runs/quickstart``) dense bf16, and exported at 1.0 and 0.5 bits per parameter of the whole
  file (vq, seeded signs, 200 teacher refinement steps, as ``make quickstart``), compressed and dequantized.

Per row: generation tokens/s (batch 1, a 32-token prompt, 128 new tokens, greedy, ``min_new_tokens`` so that every
run makes all 128), prefill tokens/s (one forward of 512 tokens; the quickstart model's context is 128, so 128
there), resident memory of the loaded model (RSS growth of the process over the load and a first forward) and the
bytes of its weights in memory (parameters, buffers and what the kernels keep: packed signs, tables), the bytes of
the whole file, perplexity on held-out text (SmolLM2: the first 4,096 held-out tokens of the built-in corpus, window
256, stride 128, as ``bench_real_export.py``; quickstart: its run's held-out split, window 128). Speed is the median
over ``--repeats`` rounds, with the min and max.

    python bench/bench_decode.py [--repeats 3] [--only smollm2|quickstart]   # writes results/decode.{json,md,png}

Exports are made once into ``runs/decode/`` (about 8 minutes); the fine-tune needs ``runs/smollm2-ft``
(``hf-signlock train --config recipes/finetune_smollm2.yaml``) and the quickstart rows ``make quickstart``: rows
whose model is missing are reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs"
WORK = RUNS / "decode"
THREADS = 2
PROMPT, NEW_TOKENS = 32, 128


def log(message: str) -> None:
    print(message, flush=True)


# --- the worker: one model, one process ---------------------------------------------------------------------------


def weight_bytes(model) -> int:
    """Bytes of the model's weights as held in memory: every distinct storage among its parameters and buffers, and
    what compressed layers keep beside their payload for the kernels (signs rebuilt from a seed or base, tables,
    the slot layout of small vq books)."""
    from hf_signlock.quantization.layers import compressed_layers

    tensors = [*model.parameters(), *model.buffers()]
    for layer in compressed_layers(model).values():
        operands = layer.kernel_operands()
        if operands is not None:
            tensors += [operands.signs, operands.table, operands.scales, *operands.layout_tensors()]
        elif layer._signs[1] is not None:
            tensors.append(layer._signs[1])
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def worker(spec: dict) -> dict:
    """Load ``spec["folder"]`` as ``spec["load"]`` says; time generation and prefill; optionally perplexity."""
    import torch

    torch.set_num_threads(THREADS)
    from memory import rss_mib
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    import hf_signlock
    from hf_signlock.kernels import native

    logging.disable_progress_bar()
    native.library()  # built and loaded before the memory baseline
    kwargs = {"dtype": getattr(torch, spec["dtype"])} if spec.get("dtype") else {}
    if spec["load"] in ("compressed", "dequantized"):  # the default (compressed), or dense modules; the base named
        kwargs["quantization_config"] = hf_signlock.SignLockConfig(
            dequantize=True if spec["load"] == "dequantized" else None, base_model=spec.get("base_model"))
    before = rss_mib()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs).eval()
    load_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(100, min(vocab, 10_000), (1, PROMPT), generator=generator)
    prefill_length = min(512, getattr(model.config, "max_position_embeddings", 512))
    prefill_ids = torch.randint(100, min(vocab, 10_000), (1, prefill_length), generator=generator)
    result = {"load_s": load_s}
    settings = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
                "pad_token_id": model.config.eos_token_id}
    if spec.get("compile"):  # a static cache, so the decode step has one shape; compiled on the first call
        settings["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward)
    with torch.inference_mode():
        model(prefill_ids[:, :8])
        result["resident_mib"] = rss_mib() - before
        result["weight_bytes"] = weight_bytes(model)
        start = time.perf_counter()
        model.generate(prompt, **(settings if spec.get("compile") else {**settings, "max_new_tokens": 8,
                                                                        "min_new_tokens": 8}))  # warm (compile)
        result["warm_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, **settings)
        result["generate_tokens_per_s"] = NEW_TOKENS / (time.perf_counter() - start)
        model(prefill_ids)
        start = time.perf_counter()
        model(prefill_ids)
        result["prefill_tokens_per_s"] = prefill_length / (time.perf_counter() - start)
        result["prefill_tokens"] = prefill_length
        result["modules"] = type(model.get_output_embeddings()).__name__
    if spec.get("perplexity"):
        from transformers import AutoTokenizer

        from hf_signlock.evaluation.perplexity import sliding_window_perplexity
        from hf_signlock.text import resolve_eval_text

        source = spec["text_source"]
        text = resolve_eval_text(AutoTokenizer.from_pretrained(source), None, model_source=source,
                                 split="validation", max_tokens=spec.get("tokens"))
        window = spec["window"]
        result["perplexity"] = sliding_window_perplexity(model, text.input_ids, window=window,
                                                         stride=window // 2)["perplexity"]
    return result


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=1800, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:400]}
    return json.loads(lines[-1])


# --- exports ------------------------------------------------------------------------------------------------------


def ensure_export(out: Path, source: Path, **kwargs) -> Path | None:
    from hf_signlock.quantization.export import export_run

    if (out / "config.json").exists():
        return out
    if not source.exists():
        return None
    log(f"exporting {source.name} -> {out.name} {kwargs}")
    export_run(source, out, overwrite=True, **kwargs)
    return out


def specs(only: str | None) -> list[dict]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from get_smollm2 import smollm2_folder

    rows = []
    if only in (None, "smollm2"):
        smollm2 = smollm2_folder()
        text = {"text_source": str(smollm2), "tokens": 4096, "window": 256}
        rows += [{"name": "SmolLM2-135M dense fp32", "family": "smollm2", "folder": str(smollm2), "load": "dense",
                  "dtype": "float32", **text},
                 {"name": "SmolLM2-135M dense bf16", "family": "smollm2", "folder": str(smollm2), "load": "dense",
                  "dtype": "bfloat16", "baseline": True, **text}]
        exports = [("fine-tune vs base, 2.3 bpw", ensure_export(WORK / "smollm2-ft-base-2.3", RUNS / "smollm2-ft",
                                                                bits_per_weight=2.3, sign_source="base"),
                    {"text_source": str(RUNS / "smollm2-ft"), "base_model": str(smollm2)}),
                   ("3.25 bpw", ensure_export(WORK / "smollm2-3.25", smollm2, bits_per_weight=3.25), {}),
                   ("4.25 bpw", ensure_export(WORK / "smollm2-4.25", smollm2, bits_per_weight=4.25), {})]
        for label, folder, extra in exports:
            for load in ("compressed", "dequantized"):
                rows.append({"name": f"SmolLM2-135M {label}, {load}", "family": "smollm2",
                             "folder": str(folder) if folder else None, "load": load, **text, **extra})
        # torch.compile with a static cache: once (its compilation takes minutes), against the same eager rows
        rows += [{"name": "SmolLM2-135M dense bf16, torch.compile", "family": "smollm2", "folder": str(smollm2),
                  "load": "dense", "dtype": "bfloat16", "compile": True, "once": True, **text},
                 {"name": "SmolLM2-135M 3.25 bpw, compressed, torch.compile", "family": "smollm2",
                  "folder": str(exports[1][1]) if exports[1][1] else None, "load": "compressed", "compile": True,
                  "once": True, **text}]
    if only in (None, "quickstart"):
        run = RUNS / "quickstart"
        text = {"text_source": str(run), "tokens": None, "window": 128}
        rows.append({"name": "quickstart dense bf16", "family": "quickstart", "folder": str(run) if run.exists()
                     else None, "load": "dense", "dtype": "bfloat16", "baseline": True, **text})
        for budget in (1.0, 0.5):
            folder = ensure_export(WORK / f"quickstart-{budget}", run, bits_per_parameter=budget, refine_steps=200,
                                   refine_loss="teacher")
            for load in ("compressed", "dequantized"):
                rows.append({"name": f"quickstart {budget} bpp, {load}", "family": "quickstart",
                             "folder": str(folder) if folder else None, "load": load, **text})
    return rows


def llama_cpp_rows(source: Path, deps: str | None, repeats: int) -> list[dict]:
    """llama-bench of SmolLM2 in GGUF (f16 and three k-quants), 2 threads, pp512 and tg128; a failed build or
    conversion is one row with its error."""
    import llama_cpp_tools as llama_cpp

    sys.path.insert(0, str(ROOT / "scripts"))
    from get_smollm2 import smollm2_folder

    work = WORK / "llama.cpp"
    try:
        log("llama.cpp: building llama-bench and llama-quantize (once, about 15 minutes on 2 cores)")
        binaries = llama_cpp.build(source, work / "build")
        f16 = llama_cpp.convert(source, smollm2_folder(), work / "smollm2-135m-f16.gguf",
                                Path(deps) if deps else None)
        files = {"f16": f16, **{kind: llama_cpp.quantize(binaries, f16, kind) for kind in ("Q4_K_M", "Q3_K_M",
                                                                                         "Q2_K")}}
    except (subprocess.CalledProcessError, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        message = (detail.decode(errors="replace") if isinstance(detail, bytes) else detail).strip()
        return [{"name": "llama.cpp", "family": "smollm2", "folder": None, "load": "llama.cpp",
                 "error": f"llama.cpp did not build or convert here: {(message or str(error))[-300:]}"}]
    rows = []
    for kind, path in files.items():
        log(f"llama-bench {path.name}")
        result = llama_cpp.bench(binaries, path, THREADS, 512, NEW_TOKENS, max(repeats, 3))
        rows.append({"name": f"SmolLM2-135M llama.cpp GGUF {kind}", "family": "smollm2", "folder": str(path),
                     "load": "llama.cpp", "modules": "llama-bench", "file_bytes": result["file_bytes"],
                     "prefill_tokens": 512,
                     **{f"{key}_tokens_per_s": {"median": value["tokens_per_s"],
                                                "min": value["tokens_per_s"] - value["stddev"],
                                                "max": value["tokens_per_s"] + value["stddev"], "runs": []}
                        for key, value in (("generate", result["generate"]), ("prefill", result["prefill"]))}})
    return rows


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["smollm2", "quickstart"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--llama-cpp-src", help="llama.cpp's sources (vendor/llama.cpp of the llama-cpp-python "
                        "sdist): adds llama-bench rows of SmolLM2 in GGUF f16, Q4_K_M, Q3_K_M, Q2_K "
                        "(see llama_cpp_tools.py)")
    parser.add_argument("--llama-cpp-deps", help="a --target folder holding sentencepiece, for the converter")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from bench_real_model import checkpoint_bytes  # weight files, config, generation config: what a user downloads

    started = time.perf_counter()
    rows = specs(args.only)
    for row in rows:
        if row["folder"] and "file_bytes" not in row:
            row["file_bytes"] = checkpoint_bytes(Path(row["folder"]))
    for round_index in range(args.repeats):
        for row in rows:
            if not row["folder"] or "error" in row or (row.get("once") and round_index):
                continue
            log(f"round {round_index + 1}/{args.repeats}: {row['name']}")
            result = run_worker({**row, "perplexity": round_index == 0 and not row.get("compile")})
            if "error" in result:
                row["error"] = result["error"]
                continue
            for key, value in result.items():
                row.setdefault("measured", {}).setdefault(key, []).append(value)
    if args.llama_cpp_src and args.only != "quickstart":
        rows += llama_cpp_rows(Path(args.llama_cpp_src), args.llama_cpp_deps, args.repeats)
    for row in rows:
        measured = row.pop("measured", {})
        for key in ("generate_tokens_per_s", "prefill_tokens_per_s", "load_s"):
            if key in measured:
                row[key] = spread(measured[key])
        for key in ("resident_mib", "weight_bytes", "perplexity", "prefill_tokens", "modules", "warm_s"):
            if key in measured:
                row[key] = measured[key][0] if key != "resident_mib" else statistics.median(measured[key])
        if not row["folder"]:
            row["error"] = "model missing (see the docstring for how to make it)"
        elif "generate_tokens_per_s" not in row and "error" not in row and row["load"] != "llama.cpp":
            row["error"] = "not measured (--repeats 0)"
    for family in ("smollm2", "quickstart"):
        base = next((r for r in rows if r["family"] == family and r.get("baseline") and "generate_tokens_per_s"
                     in r), None)
        for row in rows:
            if base and row["family"] == family and "generate_tokens_per_s" in row:
                row["generate_x_dense_bf16"] = (row["generate_tokens_per_s"]["median"]
                                                / base["generate_tokens_per_s"]["median"])
                row["prefill_x_dense_bf16"] = (row["prefill_tokens_per_s"]["median"]
                                               / base["prefill_tokens_per_s"]["median"])
                if "weight_bytes" in row:
                    row["weight_memory_x_dense_bf16"] = row["weight_bytes"] / base["weight_bytes"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": THREADS, "repeats": args.repeats, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "seconds": round(time.perf_counter() - started)}
    (out / "decode.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2) + "\n")
    (out / "decode.md").write_text(markdown(rows, meta))
    plot(rows, out / "decode.png")
    log((out / "decode.md").read_text())


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Running compressed: speed, memory and quality (SmolLM2-135M and the quickstart model)", "",
             (f"2 threads, batch 1, {meta['prompt']}-token prompt, {meta['new_tokens']} new tokens, greedy; prefill: "
             "one forward of 512 tokens (quickstart: 128, its context). Median of "
             f"{meta['repeats']} rounds [min-max], every model loaded in a fresh process. Weight memory: parameters, "
             "buffers and what the kernels keep, in memory. x bf16: against the dense bf16 row of the same model."), "",
             ("| model | loaded as | file MB | generate tok/s | x bf16 | prefill tok/s | x bf16 | weight MB | x bf16 | "
             "RSS growth MiB | perplexity |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['load']} | | failed: {row['error']} | | | | | | | |")
            continue
        gen, pre = row["generate_tokens_per_s"], row["prefill_tokens_per_s"]
        lines.append(
            f"| {row['name']} | {row['modules']} | {row['file_bytes'] / 1e6:.1f} | {gen['median']:.1f} "
            f"[{gen['min']:.1f}-{gen['max']:.1f}] | {row.get('generate_x_dense_bf16', float('nan')):.2f} | "
            f"{pre['median']:.0f} [{pre['min']:.0f}-{pre['max']:.0f}] | {row.get('prefill_x_dense_bf16', float('nan')):.2f}"
            f" | {row.get('weight_bytes', float('nan')) / 1e6:.1f} | "
            f"{row.get('weight_memory_x_dense_bf16', float('nan')):.3f} | {row.get('resident_mib', float('nan')):.0f} | "
            f"{row.get('perplexity', float('nan')):.2f} |")
    lines += ["", f"Machine: {meta['machine']}; whole run {meta['seconds']} s. `python bench/bench_decode.py`.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a panel per family measured in this run (--only leaves the other one out, not empty)
    families = [f for f in ("smollm2", "quickstart") if any(r["family"] == f and "generate_tokens_per_s" in r
                                                            for r in rows)]
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(5.5 * max(len(families), 1), 4.2), squeeze=False)
    for ax, family in zip(axes[0], families):
        for row in [r for r in rows if r["family"] == family and "generate_tokens_per_s" in r]:
            gen = row["generate_tokens_per_s"]
            marker = "*" if row.get("compile") else {"compressed": "o", "dequantized": "s", "dense": "^",
                                                      "llama.cpp": "x"}[row["load"]]
            ax.errorbar(row["file_bytes"] / 1e6, gen["median"], yerr=[[gen["median"] - gen["min"]],
                        [gen["max"] - gen["median"]]], fmt=marker, capsize=3, label=row["name"])
        ax.set_xscale("log")
        ax.set_xlabel("file size, MB (log)")
        ax.set_ylabel("generation tokens/s (batch 1, 2 threads)")
        ax.set_title("SmolLM2-135M" if family == "smollm2" else "quickstart model")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
