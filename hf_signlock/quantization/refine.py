"""Refinement of the magnitude codecs on calibration text, with every sign held fixed.

After ``quantize_model``, the codec's floating tensors (codebooks, row scales, low-rank factors) become trainable in
fp32; codes and flips stay as they are, the rest of the model is frozen. A few hundred AdamW steps on the LM loss
(or on the KL divergence from the trained dense model, as teacher) pull the decoded magnitudes toward what the
network needs, not toward |W|. The tensors are then stored back in
their own dtype and each layer's checksum is renewed. Signs cannot move: they are multiplied in, not learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..signs import unpack_signs
from .compressed import CompressedWeight
from .format.payload import payload_digest


def _batches(dataset, batch_size: int, seed: int):
    """Shuffled full batches, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(len(dataset), generator=generator).split(batch_size):
            if len(index) == batch_size:
                yield dataset[index.tolist()]


def lm_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own next-token loss on ``ids``."""
    return model(input_ids=ids, labels=labels).loss


def distillation_loss(teacher: nn.Module):
    """KL(teacher || model) of the next-token distributions, averaged over tokens: the dense model as teacher."""
    teacher.eval()

    def loss(model, ids, labels):
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
        log_probs = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        return F.kl_div(log_probs, target, log_target=True, reduction="none").sum(-1).mean()

    return loss


def train_steps(model: nn.Module, params: list[torch.Tensor], dataset, steps: int, learning_rate: float,
                batch_size: int = 16, seed: int = 0, loss_fn=lm_loss, description: str = "training") -> list[float]:
    """``steps`` AdamW steps (cosine schedule, clip 1.0) of ``loss_fn`` on ``params``; returns the losses. Also
    what the benchmarks give a dense model, so that refined exports are compared with equally trained references."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    device = params[0].device if params else torch.device("cpu")
    progress = logging.tqdm(total=steps, desc=description, unit="step")
    for _, batch in zip(range(steps), _batches(dataset, batch_size, seed)):
        ids = torch.tensor(batch["input_ids"], device=device)
        loss = loss_fn(model, ids, torch.tensor(batch["labels"], device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        progress.update()
    progress.close()
    model.eval()
    return losses


def trainable_codec_tensors(model: nn.Module) -> dict[str, tuple[CompressedWeight, str, torch.dtype]]:
    """Every floating table of the model's SignLock layers (the embedding's too): ``name -> (layer, table, stored
    dtype)``."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, CompressedWeight):
            for name, tensor in module.stored_tensors().items():  # its own tables (a shared codebook once)
                if tensor.is_floating_point():
                    found[f"{module_name}.{name}"] = (module, name, tensor.dtype)
    return found


def refine(model: nn.Module, dataset, steps: int, learning_rate: float = 1e-3, batch_size: int = 16,
           seed: int = 0, teacher: nn.Module | None = None) -> dict:
    """Train the codec tensors of ``model``'s SignLock layers for ``steps`` steps on ``dataset`` (LM blocks): on the
    LM loss, or, given the trained dense model as ``teacher``, on the KL divergence from its predictions."""
    tensors = trainable_codec_tensors(model)
    layers = {module for module, _, _ in tensors.values()}
    for layer in layers:
        layer.pinned_signs = unpack_signs(layer.verify(), layer.shape)  # checked, decoded once, before tables change
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    leaves = []
    for module, name, _ in tensors.values():
        leaf = module.stored_tensors()[name].float().requires_grad_(True)
        module.trainable_tables[name] = leaf
        leaves.append(leaf)
    objective = "lm" if teacher is None else "teacher"
    loss_fn = lm_loss if teacher is None else distillation_loss(teacher)
    losses = train_steps(model, leaves, dataset, steps, learning_rate, batch_size, seed, loss_fn,
                         description=f"SignLock: refining codec tables ({objective} loss)")
    model.eval()
    with torch.no_grad():
        for module, name, dtype in tensors.values():
            module.write_stored({name: module.trainable_tables.pop(name).detach().to(dtype)})
    for layer in layers:
        layer.pinned_signs = None
        layer.record["stored_checksum"] = payload_digest(layer.payload)
    return {"steps": steps, "learning_rate": learning_rate, "batch_size": batch_size, "loss": objective,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
