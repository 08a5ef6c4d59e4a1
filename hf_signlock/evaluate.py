"""Perplexity of a model folder (a training run or an export) on the held-out split of the data it was trained on.

The data settings come from the run's ``signlock_stats.json`` (or an export's ``training_signlock_stats.json``),
or from a recipe. Perplexity is ``exp`` of the mean next-token loss over every token of the held-out blocks
(token-weighted, so batch sizes do not change it). Results go to ``eval.json`` beside the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from .data import DataArguments, build_lm_datasets, load_raw_datasets

EVAL_NAME = "eval.json"
_STATS_NAMES = ("signlock_stats.json", "training_signlock_stats.json")


def data_arguments_of(folder: str | os.PathLike) -> DataArguments:
    for name in _STATS_NAMES:
        path = Path(folder, name)
        if path.exists():
            recorded = json.loads(path.read_text()).get("data")
            if recorded:
                fields = {f.name for f in dataclasses.fields(DataArguments)}
                return DataArguments(**{k: v for k, v in recorded.items() if k in fields})
    return DataArguments()  # runs from before the data settings were recorded used the defaults


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 16) -> dict:
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        ids = torch.tensor(batch["input_ids"], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = torch.tensor(batch["labels"], device=device)[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total_loss += loss.item()
        total_tokens += int((targets != -100).sum())
    mean = total_loss / total_tokens
    return {"eval_loss": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "blocks": len(dataset)}


def evaluate_folder(folder: str | os.PathLike, data_args: DataArguments | None = None, batch_size: int = 16,
                    write: bool = True) -> dict:
    """Load ``folder`` with ``from_pretrained`` (SignLock exports included) and measure its held-out perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_args = data_args or data_arguments_of(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held_out = build_lm_datasets(load_raw_datasets(data_args), tokenizer, data_args)["validation"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    result = perplexity(model, held_out, batch_size)
    if write:
        Path(folder, EVAL_NAME).write_text(json.dumps(result, indent=2))
    return result
