"""Calibration for the codecs that use it: text windows, and each target layer's input Hessian ``H = 2 X^T X / n``.

The text comes from any source ``hf-signlock eval`` reads (a local file or folder, a ``datasets`` name, the
built-in corpus; by default the training split of the run's own data, which for a model without a run is the
built-in corpus), tokenised with the model's tokenizer; ``samples`` windows of ``sequence_length`` tokens are drawn
from it at seeded random offsets. The Hessians come from one pass of the dense model over those windows, with a
forward hook on every target layer adding its input's ``X^T X`` (in float64: 16k tokens of 1,536-wide inputs lose
digits in float32). They are all taken from the dense model, not re-taken after each layer is quantised (GPTQ's
sequential variant): one pass, and on SmolLM2-135M the sequential variant did not pay for its 30 passes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from ..errors import DataError

logger = logging.get_logger(__name__)


@dataclass
class CalibrationArguments:
    """What a calibrated export reads.

    Args:
        dataset: the text (as ``hf-signlock eval --dataset``); None: the run's own data, else the built-in corpus.
        dataset_config_name: the ``datasets`` config of ``dataset``.
        split: the split to draw from (the training split by default: held-out text stays unseen).
        text_column: the column holding the text.
        samples: windows drawn; 0 turns calibration off (the codec then rounds without error feedback).
        sequence_length: tokens per window.
        seed: seed of the window offsets.
        batch_size: windows per forward pass while the Hessians are collected.
    """

    dataset: str | None = None
    dataset_config_name: str | None = None
    split: str = "train"
    text_column: str | None = None
    samples: int = 64
    sequence_length: int = 256
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if self.samples < 0 or self.sequence_length < 2:
            raise DataError(f"calibration needs samples >= 0 and sequence_length >= 2, got {self.samples} and "
                            f"{self.sequence_length}.")

    def describe(self) -> dict:
        """The settings, for the export's report."""
        return {"dataset": self.dataset or "the run's data (default: the built-in corpus)", "split": self.split,
                "samples": self.samples, "sequence_length": self.sequence_length, "seed": self.seed}


def calibration_windows(tokenizer, args: CalibrationArguments, model_source: str | os.PathLike | None = None
                        ) -> torch.Tensor:
    """``args.samples`` x ``args.sequence_length`` token ids drawn from the calibration text."""
    from ..text import resolve_eval_text

    text = resolve_eval_text(tokenizer, args.dataset, model_source=None if model_source is None else str(model_source),
                             dataset_config_name=args.dataset_config_name, split=args.split,
                             text_column=args.text_column)
    ids = text.input_ids
    need = args.samples * args.sequence_length
    if ids.numel() < need:
        raise DataError(
            f"The calibration text ({text.description}) has {ids.numel():,} tokens; {args.samples} windows of "
            f"{args.sequence_length} need {need:,}. Lower calibration_samples or calibration_length, or pass more "
            "text with calibration_dataset."
        )
    generator = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, ids.numel() - args.sequence_length + 1, (args.samples,), generator=generator)
    logger.info(f"Calibration: {args.samples} x {args.sequence_length} tokens from {text.description}")
    return torch.stack([ids[start:start + args.sequence_length] for start in starts.tolist()])


def input_features(module: nn.Module) -> int:
    """Inputs of a Linear, or of a GPT-2 Conv1D (weight stored [in, out])."""
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def hessian_inputs(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``module_name -> the module whose input is that target's input``: a projection's own; for a token embedding
    tied to the LM head, the head's (the final hidden state, what its error is measured against); an untied embedding
    has none (its input is one token: its Hessian is diagonal over rows, and its rows are rounded each alone)."""
    from ..targets import tied_head

    head = model.get_output_embeddings() if tied_head(model) else None
    found = {}
    for name, module in targets.items():
        if not isinstance(module, nn.Embedding):
            found[name] = module
        elif head is not None:
            found[name] = head
    return found


@torch.no_grad()
def collect_hessians(model: nn.Module, windows: torch.Tensor, targets: dict[str, nn.Module],
                     batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``param_name -> H`` (float32, inputs x inputs) for every target module (``module_name -> module``), from
    one pass of ``model`` over ``windows``. Layers that read the same input (q/k/v) share one tensor."""
    largest = max(input_features(module) for module in targets.values())
    if windows.numel() < largest:
        raise DataError(
            f"{windows.numel():,} calibration tokens cannot estimate the Hessian of a layer with {largest:,} inputs "
            "(it needs at least as many tokens as inputs). Raise calibration_samples or calibration_length."
        )
    sums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}  # module -> the module whose input it reads (same tensor, same Hessian)
    last: list = [None, None]  # the previous hook's input and module: q/k/v (gate/up) are fed one tensor in a row

    def hook(name):
        def add(_module, inputs, _output):
            x = inputs[0]
            if x is last[0] and last[1] != name:
                shared[name] = last[1]
                return
            last[:] = [x, name]
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            if name not in sums:
                sums[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
            sums[name].addmm_(flat.T, flat)
        return add

    handles = [module.register_forward_hook(hook(name)) for name, module in targets.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in logging.tqdm(windows.split(batch_size), desc="SignLock: calibration Hessians", unit="batch"):
            model(input_ids=batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        last[:] = [None, None]
    scale = 2.0 / windows.numel()
    own = {name: (total * scale).float() for name, total in sums.items()}
    result = {}
    for name in targets:
        source = name
        while source not in own and source in shared:
            source = shared[source]
        if source not in own:
            raise DataError(f"{name} saw no input during calibration: the calibration pass did not reach it.")
        result[f"{name}.weight"] = own[source]
    return result
