"""Perplexity of a model folder (a training run or an export) on the held-out split of the data it was trained on.

The data settings come from the run's ``signlock_stats.json`` (or an export's copy), or are given. Perplexity is
``exp`` of the mean next-token loss over every token of the held-out blocks (token-weighted, so batch sizes do not
change it). Results go to ``eval.json`` beside the model, with the text they were measured on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from transformers.utils import logging

from ..constants import EVAL_NAME
from ..data import DataArguments, build_lm_datasets, data_arguments_of, describe_data, load_raw_datasets


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 16) -> dict:
    """Token-weighted perplexity of ``model`` on LM blocks (``input_ids``, ``labels``), with a progress bar."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in logging.tqdm(range(0, len(dataset), batch_size), desc="perplexity", unit="batch"):
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
    result = {**perplexity(model, held_out, batch_size), "dataset": describe_data(data_args)}
    if write:
        Path(folder, EVAL_NAME).write_text(json.dumps(result, indent=2))
    return result
