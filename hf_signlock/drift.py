"""The outward-drift regulariser ``R = mean_w relu(d * sigma_l - s0 * w)`` over all target weights.

Its gradient, ``-s0 / N`` wherever the signed margin ``s0 * w`` is below ``d * sigma_l``, pushes weights that drifted
toward zero back out along their reference sign. The custom autograd function recomputes that mask in backward
instead of keeping a weight-sized activation alive between forward and backward: the term costs a few elementwise
passes over the weights and no stored copy of them.
"""

from __future__ import annotations

import torch

from .reference import SignReference


class _MarginHingeSum(torch.autograd.Function):
    """sum(relu(threshold - s0 * w)) with the gradient of torch.relu (0 at the kink)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, s0: torch.Tensor, threshold: float) -> torch.Tensor:
        ctx.save_for_backward(weight, s0)
        ctx.threshold = threshold
        return torch.relu(threshold - s0 * weight).sum(dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, s0 = ctx.saved_tensors
        inside = s0 * weight < ctx.threshold
        grad = torch.where(inside, -s0.to(weight.dtype), 0) * grad_output.to(weight.dtype)
        return grad, None, None


def outward_drift(reference: SignReference, margin: float) -> torch.Tensor:
    """R for the targets of ``reference``; ``margin`` is d, in units of each layer's init std."""
    total = None
    count = 0
    for target in reference.targets:
        hinge = _MarginHingeSum.apply(target.param, reference.signs(target), margin * target.init_std)
        total = hinge if total is None else total + hinge.to(total.device)
        count += target.param.numel()
    return total / count
