"""llama.cpp as a baseline: build its tools from the sources that the ``llama-cpp-python`` source distribution on
PyPI carries, convert a HF folder to GGUF, quantize it, and time it with ``llama-bench``.

    pip download llama-cpp-python --no-binary :all: --no-deps -d SRC && tar xzf SRC/llama_cpp_python-*.tar.gz -C SRC
    pip install --target DEPS sentencepiece      # the converter imports it, even for a BPE tokenizer

then pass ``SRC/llama_cpp_python-*/vendor/llama.cpp`` as ``source``. Building ``llama-bench`` and ``llama-quantize``
(CPU only, ``GGML_NATIVE``: the instructions of this machine) takes about 10-15 minutes on 2 cores, once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOLS = ("llama-bench", "llama-quantize")
CALIBRATION_TOOLS = ("llama-imatrix", "llama-perplexity")  # the peers bench's: importance matrix, its own perplexity


def build(source: Path, build_dir: Path, tools: tuple[str, ...] = TOOLS) -> Path:
    """Configure and build the tools (cached: a second call returns at once); returns the folder of the binaries."""
    binaries = build_dir / "bin"
    if all((binaries / tool).exists() for tool in tools):
        return binaries
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *tools, "-j", str(os.cpu_count() or 2)],
                   check=True, capture_output=True)
    return binaries


def convert(source: Path, hf_folder: Path, out: Path, deps: Path | None = None) -> Path:
    """``convert_hf_to_gguf.py`` of ``hf_folder`` into an f16 GGUF ``out`` (kept if it exists)."""
    if out.exists():
        return out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (source / "gguf-py", deps) if p)}
    subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(hf_folder), "--outtype", "f16",
                    "--outfile", str(out)], check=True, capture_output=True, env=env)
    return out


def quantize(binaries: Path, f16: Path, kind: str, threads: int = 2, imatrix: Path | None = None) -> Path:
    """``llama-quantize`` of the f16 GGUF to ``kind`` (Q4_K_M, Q3_K_M, ...), beside it (kept if it exists), with the
    importance matrix ``imatrix`` if given (the i-quants need one)."""
    suffix = "-imatrix" if imatrix else ""
    out = f16.with_name(f"{f16.stem.removesuffix('-f16')}-{kind}{suffix}.gguf")
    if not out.exists():
        partial = out.with_name(out.name + ".partial")  # moved into place when complete
        extra = ["--imatrix", str(imatrix)] if imatrix else []
        subprocess.run([str(binaries / "llama-quantize"), *extra, str(f16), str(partial), kind, str(threads)],
                       check=True, capture_output=True)
        partial.replace(out)
    return out


def importance_matrix(binaries: Path, f16: Path, text: Path, out: Path, context: int, threads: int = 2) -> Path:
    """``llama-imatrix`` of the f16 GGUF over the calibration text ``text`` in chunks of ``context`` tokens."""
    if not out.exists():
        partial = out.with_name(out.name + ".partial")
        subprocess.run([str(binaries / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(partial), "-c",
                        str(context), "-t", str(threads), "--no-ppl"], check=True, capture_output=True)
        partial.replace(out)
    return out


def perplexity(binaries: Path, gguf: Path, text: Path, context: int, threads: int = 2) -> float:
    """``llama-perplexity``'s own figure over ``text``: chunks of ``context`` tokens, the second half of each
    scored (its method, not the sliding windows of ``hf-signlock eval``)."""
    done = subprocess.run([str(binaries / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(context),
                           "-b", str(context), "-t", str(threads)], check=True, capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        if "Final estimate: PPL =" in line:
            return float(line.split("PPL =")[1].split()[0])
    raise RuntimeError(f"llama-perplexity printed no final estimate: {(done.stdout + done.stderr)[-300:]}")


def bench(binaries: Path, gguf: Path, threads: int = 2, prompt: int = 512, generate: int = 128,
          repeats: int = 3) -> dict:
    """``llama-bench``: prefill (pp) and generation (tg) tokens/s, mean and standard deviation over ``repeats``."""
    done = subprocess.run([str(binaries / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
                           "-n", str(generate), "-r", str(repeats), "-o", "json"], check=True, capture_output=True,
                          text=True)
    result = {}
    for test in json.loads(done.stdout):
        key = "prefill" if test.get("n_prompt", 0) else "generate"
        result[key] = {"tokens_per_s": test["avg_ts"], "stddev": test["stddev_ts"]}
    result["file_bytes"] = gguf.stat().st_size
    return result
