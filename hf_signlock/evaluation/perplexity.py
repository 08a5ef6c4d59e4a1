"""Perplexity of a causal LM on any text: the sliding-window computation of the Transformers perplexity guide.

The text is one stream of token ids. The model reads it in windows of ``window`` tokens that start ``stride``
tokens apart; each window scores only the tokens no earlier window scored (the overlap is context, its labels are
-100), so every token after the first is scored exactly once, with at least ``window - stride`` tokens of context
beyond the first window. Perplexity is ``exp(sum of NLL / scored tokens)``: token-weighted, so the batch size and
the number of processes do not change it. Under ``torchrun`` / ``accelerate launch`` each rank scores every
``world_size``-th window and the sums are reduced once with ``torch.distributed``.

``evaluate_model`` adds the rest of ``hf-signlock eval``: load the model, resolve the text (see
:mod:`hf_signlock.text`), check the window against the model's context, and add the checkpoint's bits
per weight and, with a reference, its flip rate. ``evaluate_folder`` is the held-out evaluation of a run or export
that writes ``eval.json`` beside it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from ..constants import EVAL_NAME
from ..errors import DataError, SignLockConfigError

DEFAULT_WINDOW = 1024  # the guide's example; capped at the model's context


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens ``[begin, end)`` of the stream; the last ``targets`` of them are scored."""

    begin: int
    end: int
    targets: int


def sliding_windows(length: int, window: int, stride: int) -> list[Window]:
    """The windows of the Transformers guide's loop over a stream of ``length`` tokens.

    Starts go ``0, stride, 2 * stride, ...``; a window ends ``window`` tokens later or at the end of the stream, and
    scores the tokens after the previous window's end. The first window scores its tokens ``1 .. end - 1`` (the
    first token of the stream has nothing to be predicted from).
    """
    check_window(window, stride)
    windows, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        windows.append(Window(begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return windows


def check_window(window: int, stride: int, context: int | None = None) -> None:
    """Refuse a window the model cannot read, or a stride that would leave tokens unscored."""
    if window < 2:
        raise SignLockConfigError(f"--window {window} is too short: a window needs 2 tokens or more to score one.")
    if context is not None and window > context:
        raise SignLockConfigError(
            f"--window {window} is longer than the model's context (max_position_embeddings={context}); "
            f"pass --window {context} or less."
        )
    if not 1 <= stride < window:
        # stride == window would make the first token of every window context-free: it would go unscored
        raise SignLockConfigError(
            f"--stride {stride} must be between 1 and --window - 1 = {window - 1}: each window needs at least one "
            f"token of context before the tokens it scores; pass --stride {window - 1} for windows that overlap by "
            f"one token, or --stride {window // 2} for the guide's half-window overlap."
        )


def model_context(model) -> int | None:
    """The longest input ``model`` takes (``config.max_position_embeddings``; GPT-2's ``n_positions``), or None."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    return int(context) if context else None


def default_window(context: int | None, window: int | None = None, stride: int | None = None) -> tuple[int, int]:
    """``window`` (default: the model's ``context``, at most 1024) and ``stride`` (default: half the window)."""
    if window is None:
        window = min(DEFAULT_WINDOW, context) if context else DEFAULT_WINDOW
    if stride is None:
        stride = max(1, window // 2)
    return window, stride


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _batches(windows: list[Window], batch_size: int):
    """Consecutive windows of equal length and equal scored count, ``batch_size`` at most: no padding needed."""
    batch = []
    for item in windows:
        if batch and (len(batch) == batch_size or (item.end - item.begin, item.targets)
                      != (batch[0].end - batch[0].begin, batch[0].targets)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def sliding_window_perplexity(model, input_ids, window: int, stride: int, batch_size: int = 8) -> dict:
    """Token-weighted perplexity of ``model`` on one stream of token ids, read in overlapping windows.

    ``input_ids``: a 1-D sequence (or a ``[1, n]`` tensor). ``window``: tokens per forward pass (at most the
    model's context); ``stride``: tokens between window starts, ``1 <= stride < window``. Returns ``perplexity``,
    ``eval_loss`` (mean NLL in nats), ``nll`` (its sum), ``tokens`` (scored: ``n - 1``), ``windows``, ``window``,
    ``stride``. When ``torch.distributed`` is initialised every rank must call it with the same arguments; each
    scores its share of the windows and all get the same result.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise DataError(f"The text has {ids.numel()} token(s): perplexity needs at least 2. Pass a longer --dataset.")
    check_window(window, stride, model_context(model))
    if batch_size < 1:
        raise SignLockConfigError(f"--batch_size {batch_size} must be 1 or more.")
    model.eval()
    device = next(model.parameters()).device
    rank, world = _distributed()
    windows = sliding_windows(ids.numel(), window, stride)
    mine = windows[rank::world]
    keep_logits = _accepts_logits_to_keep(model)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    progress = logging.tqdm(total=len(mine), desc="perplexity", unit="window", disable=rank != 0)
    for batch in _batches(mine, batch_size):
        inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
        labels = inputs.clone()
        length, targets = inputs.shape[1], batch[0].targets
        labels[:, : length - targets] = -100  # the overlap: context only, scored by an earlier window
        # Only the logits that predict scored tokens (plus the last, which predicts past the window) are needed:
        # `logits_to_keep` saves the [batch, window, vocab] tensor where the model supports it.
        keep = min(length, targets + 1) if keep_logits else length
        extra = {"logits_to_keep": keep} if keep_logits else {}
        logits = model(input_ids=inputs, **extra).logits[:, -keep:]
        predicted = logits[:, :-1].float()
        target = labels[:, length - keep + 1 :]
        loss = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        nll += loss.double()
        tokens += (target != -100).sum()
        progress.update(len(batch))
    progress.close()
    if world > 1:  # sums, then one division: the same token weighting as one process
        totals = torch.stack([nll, tokens])
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        nll, tokens = totals[0], totals[1]
    total_nll, total_tokens = float(nll), round(float(tokens))
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "eval_loss": mean, "nll": total_nll, "tokens": total_tokens,
            "windows": len(windows), "window": window, "stride": stride}


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 16) -> dict:
    """Token-weighted perplexity of ``model`` on LM blocks (``input_ids``, ``labels``), each block on its own.

    The block evaluation of the training loop (the first token of each block is context only); kept for the
    benchmarks that compare codecs on the exact blocks the Trainer evaluates.
    """
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


def _local_folder(source) -> Path | None:
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    return path if path is not None and path.is_dir() else None


def _default_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def checkpoint_bits(folder: str | os.PathLike) -> dict:
    """Bits per target weight and whole-checkpoint bits per parameter of a SignLock export; ``{}`` otherwise."""
    from .references import signlock_quantization_config

    if signlock_quantization_config(str(folder)) is None:
        return {}
    from ..quantization.bits import checkpoint_report

    report = checkpoint_report(folder)
    return {"bpw": report["bpw"], "bits_per_parameter": report["checkpoint"]["bits_per_parameter"],
            "checkpoint_bytes": report["checkpoint"]["bytes"], "codec": report["codec"],
            "checkpoint_checksum": report["config_checksum"]}  # the card shows figures of this very checkpoint


def sign_flips(model_source: str, model, reference: str | None) -> dict:
    """Flip rate of ``model`` against ``reference`` (None: what the run or export records); ``{}`` when no
    reference is given and none is recorded."""
    from .references import resolve_reference
    from .sign_metrics import flip_report

    signs = resolve_reference(model_source, reference, model=model)
    if signs is None:
        return {}
    report = flip_report(model, signs)
    return {key: report[key] for key in ("flip_rate", "flips", "weights", "reference") if key in report}


def evaluate_model(model, dataset: str | None = None, *, tokenizer=None, dataset_config_name: str | None = None,
                   split: str | None = None, text_column: str | None = None, window: int | None = None,
                   stride: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                   reference: str | None = None, data_args=None, device=None, recorded_data: bool = False,
                   base_model: str | None = None) -> dict:
    """Perplexity of ``model`` on ``dataset``, the computation behind ``hf-signlock eval``.

    ``model``: a local folder or a Hub id (dense or SignLock; loaded with ``from_pretrained``), or a loaded model
    (then pass ``tokenizer``). ``dataset``: a text/json/csv/parquet file, a folder of them, a ``datasets`` name, or
    None for the held-out split of the run's own data (``data_args`` to override it); see
    :func:`hf_signlock.text.resolve_eval_text`. ``window`` defaults to the model's context (at most
    1024), ``stride`` to half the window. ``max_tokens`` keeps the first tokens of the text (quick runs).
    ``base_model``: where the base of an export stored against one is (the caller's word: any folder or Hub id).
    ``recorded_data``: read local data files the model's recorded training settings name outside its folder
    (otherwise refused: a checkpoint's files are input). ``reference``: the signs to count flips against (None:
    what the run or export recorded, if anything).
    ``device``: where a MODEL given by path is loaded (default: this process's GPU, else the CPU); a loaded model
    stays where it is.

    Returns the :func:`sliding_window_perplexity` result plus ``model``, ``dataset`` (in words), ``bpw`` and
    ``bits_per_parameter`` for a SignLock export, and ``flip_rate``/``flips``/``weights``/``reference`` when a
    reference resolves.
    """
    from transformers import AutoTokenizer

    from ..errors import ModelLoadError
    from ..paths import check_model_folder
    from .loading import load_causal_lm, load_failure
    from ..text import resolve_eval_text

    loaded = not isinstance(model, (str, os.PathLike))
    source = str(getattr(model, "name_or_path", "") or "") if loaded else str(model)
    if loaded:
        if tokenizer is None:
            raise SignLockConfigError("evaluate_model(model=<a loaded model>) needs `tokenizer=`; or pass the path.")
    else:
        check_model_folder(model, "MODEL")
        device = torch.device(device) if device is not None else _default_device()
        # read the context from the config first: a bad --window fails before the weights load
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError, AttributeError, TypeError, KeyError) as error:  # a malformed config.json
            raise load_failure("MODEL", source, error) from error
        context = getattr(config, "max_position_embeddings", None)
        check_window(*default_window(context, window, stride), context)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model)
            except (OSError, ValueError) as error:
                raise ModelLoadError(f"MODEL {source!r} has no tokenizer that loads: {error}. Save one beside the "
                                     "model (`tokenizer.save_pretrained(folder)`).") from error
        kwargs = {"device_map": {"": device}} if device.type == "cuda" else {}
        if base_model is not None:
            from ..quantization.config import SignLockConfig
            from .references import signlock_quantization_config

            if signlock_quantization_config(source) is None:
                raise SignLockConfigError(f"--base_model applies to a SignLock export; {source!r} is not one.")
            kwargs["quantization_config"] = SignLockConfig(base_model=base_model)
        model = load_causal_lm(model, "MODEL", **kwargs)
    window, stride = default_window(model_context(model), window, stride)
    check_window(window, stride, model_context(model))
    text = resolve_eval_text(tokenizer, dataset, model_source=source, dataset_config_name=dataset_config_name,
                             split=split, text_column=text_column, data_args=data_args, max_tokens=max_tokens,
                             recorded_data=recorded_data)
    result = {"model": source, **sliding_window_perplexity(model, text.input_ids, window, stride, batch_size),
              "dataset": text.description}
    if max_tokens is not None:
        result["max_tokens"] = max_tokens
    folder = _local_folder(source)
    if folder is not None:
        result.update(checkpoint_bits(folder))
    result.update(sign_flips(source, model, reference))
    return result


def markdown_report(result: dict) -> str:
    """A short markdown report of an :func:`evaluate_model` result (what ``hf-signlock eval --output`` writes)."""
    rows = [("Model", f"`{result.get('model', '')}`"), ("Text", result.get("dataset", "")),
            ("Perplexity", f"{result['perplexity']:.4f}"), ("Mean NLL (nats/token)", f"{result['eval_loss']:.5f}"),
            ("Scored tokens", f"{result['tokens']:,}"),
            ("Window / stride", f"{result['window']} / {result['stride']} ({result['windows']:,} windows)")]
    if "bpw" in result:
        rows += [("Bits per target weight", f"{result['bpw']:.4f}"),
                 ("Bits per parameter (whole checkpoint)", f"{result['bits_per_parameter']:.4f}")]
    if "flip_rate" in result:
        reference = result.get("reference")
        rows.append(("Flip rate", f"{result['flip_rate']:.4g}" + (f" (against {reference})" if reference else "")))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return ("# Perplexity\n\n| | |\n|---|---|\n" + table + "\n\nEach token after the first is scored once, with at least "
            "window - stride tokens of context after the first window (`hf-signlock eval`, docs/evaluation.md).\n")


def evaluate_folder(folder: str | os.PathLike, data_args=None, batch_size: int = 16, write: bool = True) -> dict:
    """Held-out perplexity of a run or an export in ``folder`` (loaded with ``from_pretrained``), on the data the
    run recorded (read wherever it is: the caller names its own run) or ``data_args``, with ``hf-signlock eval``'s
    default window and stride; written to ``eval.json`` beside it when ``write``. Keys include ``perplexity``, ``tokens``, ``eval_loss``, ``dataset``."""
    result = evaluate_model(folder, None, data_args=data_args, batch_size=batch_size, recorded_data=True)
    if write:
        Path(folder, EVAL_NAME).write_text(json.dumps(result, indent=2, default=str))
    return result
