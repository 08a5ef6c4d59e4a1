"""Flip tracking: the effective flip rate and each weight's crossing count, observed every k optimizer steps.

A weight agrees with its reference when ``s0 * w > 0`` (zero counts as flipped). A crossing is a change of that
agreement between two consecutive observations; counts saturate at 255 (uint8, 1 byte per weight). The near-zero
band is in units of each layer's ``SignReference.sigma`` (init std, or the starting RMS in captured runs). Sign lock-in
theory predicts a geometric tail for the crossing counts: ``P(N >= k+1 | N >= k)`` roughly constant below 1.
"""

from __future__ import annotations

import math

import torch

from .reference import SignReference
from .sharding import DTensor, LocalPart, all_reduce_sum, local_part

_MAX_COUNT = 255


def geometric_tail_ratio(histogram: list[int]) -> float | None:
    """Pooled maximum-likelihood ratio ``r`` of a geometric tail beyond one crossing.

    With survival counts ``S(k) = #(N >= k)``, ``r = sum_{k>=1} S(k+1) / sum_{k>=1} S(k)``: the MLE of a constant
    ``P(N >= k+1 | N >= k)`` for k >= 1. None when no weight crossed.
    """
    survival = [sum(histogram[k:]) for k in range(len(histogram))]
    denominator = sum(survival[1:])
    if denominator == 0:
        return None
    return sum(survival[2:]) / denominator


def tail_ratios(histogram: list[int]) -> list[float | None]:
    """``P(N >= k+1 | N >= k)`` for k = 1 .. max, the per-step ratios behind the fitted one."""
    survival = [sum(histogram[k:]) for k in range(len(histogram))]
    return [survival[k + 1] / survival[k] if survival[k] else None for k in range(1, len(histogram) - 1)]


class FlipTracker:
    """Observes the target weights of ``reference``; holds the state that a checkpoint saves."""

    def __init__(self, reference: SignReference, near_zero_band: float = 0.1):
        self.reference = reference
        self.near_zero_band = near_zero_band
        self.num_weights = sum(t.param.numel() for t in reference.targets)
        self.sharded = False
        self.agree: dict[str, torch.Tensor] = {}
        self.crossings: dict[str, torch.Tensor] = {}
        self.last_step: int | None = None
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def observe(self, step: int) -> dict[str, float]:
        """Record one observation; returns ``flip_rate``, ``flips`` and ``near_zero_fraction`` now."""
        counts = None
        for target in self.reference.targets:
            part = local_part(target.name, target.param)
            self.sharded = part.sharded
            weight = part.tensor.detach()
            agree = self.reference.signs(target, part) * weight > 0
            near_zero = (weight.abs() < self.near_zero_band * self.reference.sigma(target)).sum()
            found = torch.stack([agree.numel() - agree.sum(), near_zero])
            counts = found if counts is None else counts + found
            previous = self._local_state(target.name, part)
            if previous is None:
                self.crossings[target.name] = torch.zeros_like(agree, dtype=torch.uint8)
            else:
                crossings = self.crossings[target.name]
                crossings += (agree != previous) & (crossings < _MAX_COUNT)
            self.agree[target.name] = agree
        flips, near_zero = self._sum_over_shards(counts).tolist()
        self.last_step = step
        self.last = {
            "flip_rate": flips / self.num_weights,
            "flips": flips,
            "near_zero_fraction": near_zero / self.num_weights,
        }
        return self.last

    def _local_state(self, name: str, part: LocalPart) -> torch.Tensor | None:
        """The previous agreement of the local part; a whole-tensor state (restored from a checkpoint before the
        model was sharded) is cut down to this process's rows first."""
        previous = self.agree.get(name)
        local = part.tensor
        if previous is not None and previous.shape != local.shape:
            rows = slice(part.start, part.start + local.numel())
            previous = self.agree[name] = previous.reshape(-1)[rows].view(local.shape).clone()
            self.crossings[name] = self.crossings[name].reshape(-1)[rows].view(local.shape).clone()
        return previous

    def _sum_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values) if self.sharded else values

    def crossing_histogram(self) -> list[int]:
        """``histogram[k]`` = number of target weights that crossed k times."""
        device = next(iter(self.crossings.values())).device if self.crossings else "cpu"
        total = torch.zeros(_MAX_COUNT + 1, dtype=torch.int64, device=device)
        for counts in self.crossings.values():
            total += torch.bincount(counts.reshape(-1).long(), minlength=_MAX_COUNT + 1)
        histogram = self._sum_over_shards(total).tolist()
        while len(histogram) > 1 and histogram[-1] == 0:
            histogram.pop()
        return histogram

    def summary(self) -> dict:
        histogram = self.crossing_histogram()
        ratio = geometric_tail_ratio(histogram)
        return {
            **self.last,
            "observed_step": self.last_step,
            "crossing_histogram": histogram,
            "geometric_tail_ratio": None if ratio is None or math.isnan(ratio) else ratio,
            "tail_ratios": tail_ratios(histogram),
            "target_weights": self.num_weights,
        }

    # --- checkpointing ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole-tensor state (FSDP shards are gathered: every process must call this), so that a checkpoint does
        not depend on how many processes wrote it."""
        state = {}
        for target in self.reference.targets:
            if target.name in self.agree:
                state[f"agree.{target.name}"] = self._whole(target, self.agree[target.name])
                state[f"crossings.{target.name}"] = self._whole(target, self.crossings[target.name])
        return state

    def _whole(self, target, local: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return local.cpu()
        param = target.param
        as_bytes = local.to(torch.uint8)  # gloo cannot gather bool
        whole = DTensor.from_local(as_bytes, param.device_mesh, param.placements, shape=param.shape,
                                   stride=param.stride()).full_tensor()
        return whole.to(local.dtype).cpu()

    def load_state_dict(self, state: dict[str, torch.Tensor], last_step: int | None, last: dict) -> None:
        for target in self.reference.targets:
            if f"agree.{target.name}" in state:
                self.agree[target.name] = state[f"agree.{target.name}"].to(target.param.device)
                self.crossings[target.name] = state[f"crossings.{target.name}"].to(target.param.device)
        self.last_step = last_step
        self.last = dict(last)
