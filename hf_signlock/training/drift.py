"""The outward-drift regulariser ``R = mean_w relu(d * sigma_l - s0 * w)`` over all target weights.

``sigma_l`` is ``SignReference.sigma`` of the weight's layer: its init std in seeded runs, the RMS of its starting
weights in captured runs (fine-tuning), so that ``d`` means the same fraction of a layer's typical magnitude either
way. The hinge acts on the weights whose signed margin ``s0 * w`` is below ``d * sigma_l``; ``margin_share`` says how
many those are.

Its gradient, ``-s0 / N`` wherever the signed margin ``s0 * w`` is below ``d * sigma_l``, pushes weights that drifted
toward zero back out along their reference sign. The custom autograd function recomputes that mask in backward
instead of keeping a weight-sized activation alive between forward and backward: the term costs a few elementwise
passes over the weights and no stored copy of them.
"""

from __future__ import annotations

import torch

from .reference import SignReference
from .sharding import all_reduce_sum, local_part, process_count


class _MarginHingeSum(torch.autograd.Function):
    """sum_l sum(relu(threshold_l - s0_l * w_l)) over all targets in one graph node, with torch.relu's gradient
    (0 at the kink). One node instead of one per tensor: the per-call overhead, not the arithmetic, dominates."""

    @staticmethod
    def forward(ctx, thresholds: tuple[float, ...], signs: tuple[torch.Tensor, ...], *weights: torch.Tensor):
        ctx.save_for_backward(*weights)
        ctx.thresholds, ctx.signs = thresholds, signs
        total = torch.zeros((), dtype=torch.float32, device=weights[0].device)
        for threshold, s0, weight in zip(thresholds, signs, weights):
            total += (s0 * weight).neg_().add_(threshold).relu_().sum(dtype=torch.float32).to(total.device)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = []
        for threshold, s0, weight in zip(ctx.thresholds, ctx.signs, ctx.saved_tensors):
            # d/dw relu(t - s0 w) = -s0 inside the margin, else 0; built in int8 (cheap) before one cast.
            coefficient = (s0 * weight < threshold).to(torch.int8).mul_(s0)
            grads.append(coefficient.to(weight.dtype).mul_(-grad_output.to(weight.device, weight.dtype)))
        return (None, None, *grads)


def outward_drift(reference: SignReference, margin: float) -> torch.Tensor:
    """R for the targets of ``reference``; ``margin`` is d, in units of each layer's ``reference.sigma``.

    Under FSDP each process gets the share of R from the rows it holds (they sum to R over the processes), and
    its gradient lands on those rows directly, exact without any averaging.
    """
    targets = reference.targets
    parts = [local_part(t.name, t.param) for t in targets]
    total = None
    for sharded in (True, False):
        chosen = [(t, part) for t, part in zip(targets, parts) if part.sharded is sharded]
        if not chosen:
            continue
        thresholds = tuple(margin * reference.sigma(t) for t, _ in chosen)
        signs = tuple(reference.signs(t, part) for t, part in chosen)
        value = _MarginHingeSum.apply(thresholds, signs, *(part.tensor for _, part in chosen))
        if not sharded and total is not None:
            # Beside row shards, a whole tensor is one that FSDP2 unsharded for the forward pass (the root's
            # embedding and head, which it reshards only after backward): every process holds all of it. Its
            # gradient stays whole (FSDP averages it over the processes), its value counts once in the sum over them.
            value = value + (value / process_count() - value).detach()
        total = value if total is None else total + value
    return total / sum(t.param.numel() for t in targets)


@torch.no_grad()
def margin_share(reference: SignReference, margin: float) -> float:
    """The share of the target weights inside the margin now (``s0 * w < d * sigma_l``): those the hinge pushes."""
    counts, sharded = [], False
    for t in reference.targets:
        part = local_part(t.name, t.param)
        sharded = sharded or part.sharded
        counts.append((reference.signs(t, part) * part.tensor.detach() < margin * reference.sigma(t)).sum())
    if not counts:
        return 0.0
    inside = torch.stack(counts).sum()
    if sharded:  # FSDP row shards: each process counted its own rows
        inside = all_reduce_sum(inside)
    return inside.item() / sum(t.param.numel() for t in reference.targets)
