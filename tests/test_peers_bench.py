"""The peers bench (``bench/peers/run.py``) end to end on a tiny model, one test a peer, so that it does not rot.

The tiny model is a 2-layer Llama with SmolLM2's tokenizer (llama.cpp's converter knows it; the layers' widths,
64 and 128, divide every tool's group). Each test runs the driver as a user does, for one peer and one point, and
checks the row it writes: bits per target weight and per parameter from the files, a finite perplexity, a speed.
Peers that need their own environment install it once into the cache (``bench/peers/envs.py``), a few minutes the
first time. llama.cpp needs its sources and a 15-minute build: it runs only where ``HF_SIGNLOCK_LLAMA_CPP_SRC``
names them (``bench/llama_cpp_tools.py`` says how to get them; ``HF_SIGNLOCK_LLAMA_CPP_BUILD`` names a build folder to
reuse); elsewhere it is skipped with that reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from real_model import smollm2_folder
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "peers" / "run.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_driver(tiny_model: Path, tmp_path: Path, peer: str, point: str, *extra: str) -> dict:
    stem = tmp_path / "peers"
    done = subprocess.run([sys.executable, str(RUN), "--model", str(tiny_model), "--peers", peer, "--points",
                           f"{peer}:{point}", "--tokens", "512", "--calibration-samples", "4", "--no-dense",
                           "--work", str(tmp_path / "work"), "--results", str(stem), "--finetune", "", *extra],
                          capture_output=True, text=True, timeout=3000, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".md").exists()
    [row] = result["rows"]
    assert (row["tool"], row["method"]) == (peer, point)
    return row


def check_row(row: dict, bpw_range: tuple[float, float]) -> None:
    assert row.get("error") is None, row["error"]
    assert bpw_range[0] <= row["target_bpw"] <= bpw_range[1], row["target_bpw"]
    assert row["file_bits_per_parameter"] > row["target_bpw"] * 0.5  # the download counts more than the targets
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert row["tokens_per_s"] > 0


def test_hf_signlock(tiny_model, tmp_path):
    row = run_driver(tiny_model, tmp_path, "hf_signlock", "signmag-3.25")
    check_row(row, (2.5, 3.3))  # its budget counts every byte of the layers' records
    assert "-bit codes / group" in row["detail"] and "embedding" in row["detail"]


def test_hqq(tiny_model, tmp_path):
    row = run_driver(tiny_model, tmp_path, "hqq", "4bit-g64")
    check_row(row, (4.4, 4.6))  # 4-bit codes + a bf16 scale and zero per 64 weights: 4.5


def test_bitsandbytes(tiny_model, tmp_path):
    row = run_driver(tiny_model, tmp_path, "bitsandbytes", "nf4")
    # 4 bits + an fp32 absmax per 64: 4.5, plus each layer's fixed ~250 bytes of quant map and state (a fifth of a
    # bit over this tiny model's 4,096-weight layers; 0.02 over SmolLM2's)
    check_row(row, (4.5, 5.0))


def test_llm_compressor(tiny_model, tmp_path):
    row = run_driver(tiny_model, tmp_path, "llm-compressor", "W4A16-g64")
    check_row(row, (4.2, 4.3))  # 4 bits + a bf16 scale per 64: 4.25


@pytest.mark.skipif(not os.environ.get("HF_SIGNLOCK_LLAMA_CPP_SRC"),
                    reason="llama.cpp needs its sources (HF_SIGNLOCK_LLAMA_CPP_SRC) and a 15-minute build")
def test_llama_cpp(tiny_model, tmp_path):
    # --tokens 1024: llama-perplexity wants two 256-token chunks of the text once its tokenizer has read it again
    extra = ["--llama-cpp-src", os.environ["HF_SIGNLOCK_LLAMA_CPP_SRC"], "--tokens", "1024"]
    for variable, option in (("HF_SIGNLOCK_LLAMA_CPP_DEPS", "--llama-cpp-deps"),
                             ("HF_SIGNLOCK_LLAMA_CPP_BUILD", "--llama-cpp-build")):  # a build to reuse
        if os.environ.get(variable):
            extra += [option, os.environ[variable]]
    row = run_driver(tiny_model, tmp_path, "llama.cpp", "Q4_K_M", *extra)
    check_row(row, (4.0, 9.0))  # 64-wide rows fall back from the k-quants to other types: reported, not fixed
    assert row["perplexity_llama_cpp"] > 1
