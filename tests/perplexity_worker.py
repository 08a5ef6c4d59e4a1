"""Tiny evaluation fixtures, and the worker of the two-process perplexity test.

As a module: ``corpus_text()``, ``tiny_tokenizer()`` and ``tiny_model_folder(path)`` build a small text, a BPE
tokenizer trained on it and a random tiny Llama saved with ``save_pretrained`` (no download).

As a script, under ``torchrun --nproc_per_node N tests/perplexity_worker.py FOLDER TEXT WINDOW STRIDE OUT``: every
rank joins a gloo group, scores TEXT with the model in FOLDER and writes ``OUT/rank<R>.json`` with the result and
how many windows it ran itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = ["thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "do", "shake", "the", "darling",
         "buds", "of", "may", "summer's", "lease", "hath", "all", "too", "short", "a", "date"]
CONTEXT = 64  # max_position_embeddings of the tiny model


def corpus_text(lines: int = 300) -> str:
    """A deterministic pseudo-English text, one line of 11 words per row."""
    return "".join(" ".join(WORDS[(i * k + k * k) % len(WORDS)] for k in range(1, 12)) + "\n" for i in range(lines))


def tiny_tokenizer(text: str | None = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``text`` (default: ``corpus_text()``)."""
    from hf_signlock.data import train_tokenizer

    return train_tokenizer([text or corpus_text()], vocab_size)


def tiny_model(vocab_size: int, seed: int = 0):
    """A random 2-layer Llama with a 64-token context."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=CONTEXT,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_model_folder(path: str | Path, data_files: list[str] | None = None, block_size: int = 32) -> Path:
    """Save a tiny model and its tokenizer in ``path``; with ``data_files``, also the ``signlock_stats.json`` data
    record of a run trained on them (what ``hf-signlock eval`` uses by default)."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if data_files:
        data = {"dataset_name": None, "data_files": [str(f) for f in data_files], "text_column": "text",
                "validation_fraction": 0.2, "block_size": block_size, "tokenizer_vocab_size": 300}
        (path / "signlock_stats.json").write_text(json.dumps({"data": data}))
    return path


def main(folder: str, text: str, window: str, stride: str, out: str) -> None:
    """One rank of the two-process test."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_signlock.evaluation.perplexity import sliding_window_perplexity

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = AutoTokenizer.from_pretrained(folder)(Path(text).read_text())["input_ids"]
    rows = []  # windows this rank ran: the batch sizes of its forward passes
    model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    result = sliding_window_perplexity(model, ids, int(window), int(stride), batch_size=3)
    Path(out, f"rank{rank}.json").write_text(json.dumps({**result, "windows_here": sum(rows)}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
