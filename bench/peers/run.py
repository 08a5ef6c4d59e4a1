"""Side by side with what users pick instead: llama.cpp, HQQ, llm-compressor (GPTQ), bitsandbytes and hf_signlock on
the same model, the same calibration text and the same held-out tokens, in one run.

    python bench/peers/run.py [--peers llama.cpp,hqq,llm-compressor,bitsandbytes,hf_signlock]
        [--llama-cpp-src SRC/llama_cpp_python-*/vendor/llama.cpp --llama-cpp-deps DEPS]
        # writes bench/results/peers.{json,md,png}

The driver writes the protocol once (``protocol.json`` in ``--work``, default ``runs/peers``): the dense model
(default SmolLM2-135M-Instruct, ``scripts/get_smollm2.py``), the held-out ids (the first ``--tokens`` tokens of the
built-in corpus' held-out split, as ``bench_real_export.py``), the calibration windows (the export's default: 64 x
256 tokens of the training split; never held-out text), the perplexity windows (256, stride 128) and the counts
every row divides by. Then each peer's script (``peer_<tool>.py``) runs in its tool's own environment
(``envs.py``: made once, cached) and prints its rows; a peer that fails to install, build or run gives rows with
its error, and the others still run. Perplexity is hf_signlock's sliding-window evaluation in every environment
(llama.cpp's GGUFs dequantized by transformers), beside llama.cpp's own ``llama-perplexity``.

Per row: bits per target weight (the 210 projections' stored bits over their weights), bits per parameter of the
whole download (every file the tool writes, tokenizer included, over the dense model's parameters), perplexity,
time to quantize, time to load, generation tokens/s at batch 1 (llama.cpp's own runner for GGUF, transformers for
the rest), resident memory the load added. llama.cpp's tools need its sources (the ``llama-cpp-python`` source
distribution, see ``bench/llama_cpp_tools.py``); without ``--llama-cpp-src`` its rows say so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(HERE))
from common import log, row
from envs import REQUIREMENTS, PeerInstallError, python_for

SCRIPTS = {"hf_signlock": "peer_signlock.py", "llama.cpp": "peer_llama_cpp.py", "hqq": "peer_hqq.py",
           "llm-compressor": "peer_llmcompressor.py", "bitsandbytes": "peer_bitsandbytes.py"}
WINDOW, STRIDE = 256, 128
PEER_TIMEOUT_S = 60 * 60


def write_protocol(args, work: Path) -> dict:
    """The shared inputs of every peer, computed once in this environment."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_signlock.quantization.calibration import CalibrationArguments, calibration_windows
    from hf_signlock.targets import find_target_modules
    from hf_signlock.text import resolve_eval_text

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    held_out = resolve_eval_text(tokenizer, None, model_source=str(args.model), split="validation",
                                 max_tokens=args.tokens)
    calibration = calibration_windows(tokenizer, CalibrationArguments(samples=args.calibration_samples),
                                      args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    targets = find_target_modules(model).values()  # the projections every export compresses
    protocol = {"model": str(Path(args.model).resolve()), "finetune": args.finetune, "threads": args.threads,
                "eval_ids": held_out.input_ids.tolist(), "eval_text": held_out.description,
                "calibration": calibration.tolist(), "window": WINDOW, "stride": STRIDE,
                "parameters": sum(p.numel() for p in model.parameters()),
                "target_weights": sum(m.weight.numel() for m in targets),
                "llama_cpp": {"source": args.llama_cpp_src, "deps": args.llama_cpp_deps,
                              "work": str(work / "llama.cpp"), "build": args.llama_cpp_build}}
    (work / "protocol.json").write_text(json.dumps(protocol))
    return protocol


def dense_rows(protocol: dict) -> list[dict]:
    """The dense model itself, fp32 and bf16: what every point is compared with."""
    import torch
    from common import file_fields, folder_bytes, measure_loaded
    from transformers import AutoModelForCausalLM

    folder = Path(protocol["model"])
    other_bytes = folder_bytes(folder) - sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    rows = []
    for dtype, bits in (("float32", 32), ("bfloat16", 16)):
        fields = measure_loaded(lambda dtype=dtype: AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype)).eval(), protocol)
        size = bits // 8 * protocol["parameters"] + other_bytes  # the weights in that dtype, tokenizer and configs
        rows.append(row("dense", dtype, **fields, **file_fields(protocol, size, bits * protocol["target_weights"]),
                        detail="every weight in " + dtype))
    return rows


def protocol_checksum(protocol: dict) -> str:
    """What makes two runs' rows comparable: the model, the held-out ids, the calibration and the windows."""
    keys = ("model", "eval_ids", "calibration", "window", "stride", "threads")
    return hashlib.sha256(json.dumps([protocol[key] for key in keys]).encode()).hexdigest()[:16]


def merged(path: Path, protocol: dict, rows: list[dict], runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows already at ``path`` with this run's in place of those it measured again (new ones after their tool's)."""
    if not path.exists():
        return rows, runs
    previous = json.loads(path.read_text())
    if previous.get("meta", {}).get("protocol_checksum") != protocol_checksum(protocol):
        raise SystemExit(f"--merge: {path} was measured with another protocol (model, text, calibration or "
                         "windows); rerun every peer instead")
    fresh = {(r["tool"], r["method"]): r for r in rows}
    kept = [fresh.pop((r["tool"], r["method"]), r) for r in previous["rows"]]
    for new in fresh.values():  # after the last row of its tool (the table stays grouped by tool), else at the end
        last = max((i for i, r in enumerate(kept) if r["tool"] == new["tool"]), default=len(kept) - 1)
        kept.insert(last + 1, new)
    return kept, previous["meta"].get("runs", []) + runs


def run_peer(peer: str, points: list[str], work: Path, threads: int) -> list[dict]:
    """One peer's rows: its script in its environment; on any failure, rows that carry the error."""
    def failed(message: str) -> list[dict]:
        return [row(peer, point, error=message[-800:]) for point in (points or ["(all)"])]

    try:
        log(f"{peer}: environment")
        python = python_for(peer)
    except (PeerInstallError, subprocess.SubprocessError, OSError) as error:
        return failed(f"did not install here: {error}")
    out = work / peer
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    log(f"{peer}: running {SCRIPTS[peer]} {' '.join(points)}")
    try:  # progress goes to our stderr as it comes; the rows are the last line of stdout
        done = subprocess.run([python, str(HERE / SCRIPTS[peer]), str(work / "protocol.json"), str(out), *points],
                              stdout=subprocess.PIPE, text=True, env=env, timeout=PEER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return failed(f"ran past {PEER_TIMEOUT_S} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return failed(f"exited with status {done.returncode}: {done.stdout[-500:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return failed(f"printed no rows: {done.stdout[-500:]}")


def runs_text(meta: dict) -> str:
    runs = meta.get("runs") or [{"seconds": meta["seconds"]}]
    if len(runs) == 1:
        return f"Run took {runs[0]['seconds']:.0f} s."
    parts = [f"{run['seconds']:.0f} s ({', '.join(run['peers'])}{'; ' + run['points'] if run['points'] else ''})"
             for run in runs]
    return f"Runs merged (same protocol): {'; then '.join(parts)}."


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Peers: the tools users pick instead, on the same model, text and bits", "",
        (f"Model: {meta['model_name']} ({meta['parameters']:,} parameters, {meta['target_weights']:,} in the target "
        f"projections). Held-out: {meta['eval_text']}, {meta['eval_tokens']:,} tokens, windows of {WINDOW}, stride "
        f"{STRIDE} (hf_signlock's evaluation in every environment). Calibration: {meta['calibration']}. "
        f"{meta['threads']} threads; {meta['machine']}. {runs_text(meta)}"), "",
        ("target bpw: stored bits of the target projections over their weights. file bpp: every byte of the download "
        "(weights, config, tokenizer) over the dense model's parameters. ppl (llama.cpp): llama-perplexity's own "
        "chunks of the same text. tok/s: greedy generation at batch 1 (llama.cpp: llama-bench tg64; others: "
        "transformers, 64 new tokens after a 32-token prompt)."), "",
        ("| tool | method | target bpw | file bpp | file MB | perplexity | ppl (llama.cpp) | tok/s | quantize s | "
        "load s | RSS MiB | notes |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value, digits=2):
        return "" if value is None else f"{value:.{digits}f}"

    for r in result["rows"]:
        note = r.get("error") or r.get("detail") or ""
        lines.append(f"| {r['tool']} | {r['method']} | {number(r['target_bpw'], 3)} | "
                     f"{number(r['file_bits_per_parameter'], 3)} | "
                     f"{number(r['file_bytes'] / 1e6 if r['file_bytes'] else None, 1)} | {number(r['perplexity'])} | "
                     f"{number(r.get('perplexity_llama_cpp'))} | {number(r['tokens_per_s'], 1)} | "
                     f"{number(r['quantize_s'], 1)} | {number(r['load_s'], 2)} | {number(r['resident_mib'], 0)} | "
                     f"{note.replace('|', '/')[:160]} |")
    return "\n".join(lines + [""] + equal_bits(result["rows"])) + "\n"


def equal_bits(rows: list[dict], within: float = 0.1) -> list[str]:
    """Each hf_signlock point against every other tool's point within ``within`` bits, per target weight and per
    parameter of the whole file: the comparisons the table's figures settle."""
    ours = [r for r in rows if r["tool"] == "hf_signlock" and r["perplexity"]]
    theirs = [r for r in rows if r["tool"] not in ("hf_signlock", "dense") and r["perplexity"]]
    header = "| hf_signlock point | bits | perplexity | peers at those bits: perplexity | lower than every one |"
    lines = [f"## At equal bits (within {within})", "", header, "|---|---|---|---|---|"]
    for key, label in (("target_bpw", "per target weight"), ("file_bits_per_parameter", "per parameter, whole file")):
        for r in ours:
            near = [p for p in theirs if abs(p[key] - r[key]) <= within]
            if near:
                listed = "; ".join(f"{p['tool']} {p['method']} ({p[key]:.3f}): {p['perplexity']:.2f}" for p in near)
                verdict = "yes" if all(r["perplexity"] < p["perplexity"] for p in near) else "no"
                lines.append(f"| {r['method']} | {r[key]:.3f} {label} | {r['perplexity']:.2f} | {listed} | {verdict} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity against whole-file bits per parameter, each tool's points joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for tool in dict.fromkeys(r["tool"] for r in rows):
        points = sorted((r["file_bits_per_parameter"], r["perplexity"]) for r in rows
                        if r["tool"] == tool and r["perplexity"] and r["file_bits_per_parameter"])
        if points:
            axis.plot(*zip(*points), marker="o", label=tool)
    axis.set_xlabel("bits per parameter, whole file")
    axis.set_ylabel("perplexity (held-out, lower is better)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=",".join(SCRIPTS), help="comma-separated: " + ", ".join(SCRIPTS))
    parser.add_argument("--points", default="", help="tool:point,... to run only these points of those tools")
    parser.add_argument("--model", help="the dense HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--finetune", help="a run fine-tuned from --model, for hf_signlock's point stored against "
                                           "its base (default: runs/smollm2-ft if it exists)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp-src")
    parser.add_argument("--llama-cpp-deps")
    parser.add_argument("--llama-cpp-build", help="a build folder of llama.cpp to reuse (default: in --work)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "peers"))
    parser.add_argument("--results", default=str(RESULTS / "peers"), help="path stem of the .json/.md/.png")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference rows")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the results already at --results (same protocol only) and replace "
                             "those this run measures again: rerun one tool or point without the rest")
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in SCRIPTS]
    if unknown:
        parser.error(f"unknown peers {unknown}: choose from {', '.join(SCRIPTS)}")
    if args.model is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        from get_smollm2 import smollm2_folder

        args.model = str(smollm2_folder())
    if args.finetune is None and (ROOT / "runs" / "smollm2-ft").is_dir():
        args.finetune = str(ROOT / "runs" / "smollm2-ft")
    chosen: dict[str, list[str]] = {}
    for item in filter(None, (p.strip() for p in args.points.split(","))):
        tool, _, point = item.partition(":")
        chosen.setdefault(tool, []).append(point)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log("protocol: held-out ids, calibration windows, counts")
    protocol = write_protocol(args, work)
    rows = [] if args.no_dense else dense_rows(protocol)
    for peer in peers:
        if peer == "llama.cpp" and not args.llama_cpp_src:
            rows += [row(peer, "(all)", error="no --llama-cpp-src: llama.cpp's sources are needed to build its "
                                              "tools (see bench/llama_cpp_tools.py)")]
            continue
        rows += run_peer(peer, chosen.get(peer, []), work, args.threads)
    runs = [{"peers": peers, "points": args.points, "seconds": round(time.perf_counter() - started, 1)}]
    stem = Path(args.results)
    if args.merge:
        rows, runs = merged(stem.with_suffix(".json"), protocol, rows, runs)
    result = {"rows": rows, "meta": {
        "model_name": Path(protocol["model"]).name, "parameters": protocol["parameters"],
        "target_weights": protocol["target_weights"], "eval_text": protocol["eval_text"],
        "eval_tokens": len(protocol["eval_ids"]),
        "calibration": f"{len(protocol['calibration'])} x {len(protocol['calibration'][0])} tokens of the training "
                       "split (the export's default)",
        "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "environments": {peer: REQUIREMENTS[peer] for peer in dict.fromkeys(r["tool"] for r in rows)
                         if peer in REQUIREMENTS},
        "protocol_checksum": protocol_checksum(protocol), "runs": runs,
        "seconds": sum(run["seconds"] for run in runs)}}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    try:
        plot(rows, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not installed: no plot")
    log(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
