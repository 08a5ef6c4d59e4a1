"""Gap-based initialisation: ``w = s0 * m`` with seeded signs and magnitudes kept away from zero.

For each target weight with init distribution ``D`` (std ``sigma``, read from the model's ``_init_weights``):

* ``s0`` are the reference signs (``seeded_signs`` or the low-rank ``template``);
* ``m`` is drawn from ``|D|`` restricted to ``|w| >= gap * sigma`` (inverse-CDF sampling, float64), then scaled by
  the constant ``c(gap)`` that brings the tensor's expected std back to ``sigma``. The smallest magnitude is thus
  ``c(gap) * gap * sigma`` (``gap_floor``); ``c < 1`` when ``gap > 0``.

``gap = 0`` is the model's ordinary init with seeded signs. Magnitudes come from a CPU ``torch.Generator`` seeded
from (seed, name): reproducible, but only the signs are a format guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SignLockConfigError
from ..signs import check_seed, reference_signs, sign_key
from .init_distribution import InitDistribution, TargetWeight, resolve_targets

SIGN_SOURCES = ("seed", "template")


def _normal_tail(gap: float) -> float:
    """Q(gap) = P(Z > gap) for a standard normal Z."""
    return 0.5 * math.erfc(gap / math.sqrt(2.0))


def gap_scale(init: InitDistribution, gap: float) -> float:
    """c(gap): the factor that keeps the std of the gap-restricted distribution equal to ``init.std``."""
    if init.kind == "normal":
        tail = _normal_tail(gap)
        density = math.exp(-0.5 * gap * gap) / math.sqrt(2.0 * math.pi)
        return 1.0 / math.sqrt(1.0 + gap * density / tail)  # E[Z^2 | |Z| >= g] = 1 + g phi(g) / Q(g)
    if init.kind == "uniform":
        bound, floor = math.sqrt(3.0), gap  # in units of sigma: U(-sqrt3, sqrt3) has std 1
        return 1.0 / math.sqrt((bound**2 + bound * floor + floor**2) / 3.0)
    raise SignLockConfigError(f"Gap init supports normal and uniform init distributions, not {init.kind!r}.")


def gap_floor(init: InitDistribution, gap: float) -> float:
    """The smallest |w| the gap init produces for a weight with init distribution ``init``."""
    return gap_scale(init, gap) * gap * init.std


def check_gap(gap: float, init: InitDistribution | None = None) -> float:
    """``gap`` as a float, refused when negative, not finite, beyond a uniform init's range or too large."""
    if not (isinstance(gap, (int, float)) and math.isfinite(gap) and gap >= 0):
        raise SignLockConfigError(f"`gap` must be a finite number >= 0 (in units of the init std), got {gap!r}.")
    if init is not None and init.kind == "uniform" and gap >= math.sqrt(3.0):
        raise SignLockConfigError(
            f"`gap`={gap} is outside a uniform init's range (|w| <= sqrt(3) sigma); use gap < {math.sqrt(3):.3f}."
        )
    if gap > 6:
        raise SignLockConfigError(f"`gap`={gap} leaves almost no probability mass; use a gap between 0 and 3.")
    return float(gap)


def _unit_magnitudes(init: InitDistribution, gap: float, numel: int, generator: torch.Generator) -> torch.Tensor:
    """|w| / sigma before rescaling: the init distribution's magnitude restricted to >= gap (float64)."""
    u = 1.0 - torch.rand(numel, generator=generator, dtype=torch.float64)  # in (0, 1]
    if init.kind == "normal":
        return -torch.special.ndtri(u * _normal_tail(gap))  # inverse CDF of the upper tail beyond `gap`
    bound = math.sqrt(3.0)
    return gap + (bound - gap) * u


@torch.no_grad()
def apply_gap_init(
    model: nn.Module,
    seed: int,
    gap: float,
    targets: str | Sequence[str] | None = None,
    sign_source: str = "seed",
    template_rank: int = 8,
    init_std: float | None = None,
    embeddings: bool = False,
    lm_head: bool | None = None,
) -> list[TargetWeight]:
    """Re-initialise the target weights of ``model`` in place as ``s0 * m`` (see the module docstring).

    ``targets`` are target-module patterns (default: every projection in the transformer blocks), ``embeddings``
    adds the token embedding and ``lm_head`` (None: as ``embeddings``) an untied LM head, ``gap`` is in units of
    each tensor's init std. Returns the target weights with their init distributions.
    """
    seed = check_seed(seed)
    check_gap(gap)
    if sign_source not in SIGN_SOURCES:
        raise SignLockConfigError(f"`sign_source` must be one of {SIGN_SOURCES}, got {sign_source!r}.")
    resolved = resolve_targets(model, targets, init_std=init_std, embeddings=embeddings,
                               lm_head=embeddings if lm_head is None else lm_head)
    for target in resolved:
        param = target.param
        if param.device.type == "meta":
            raise SignLockConfigError(
                f"{target.name} is on the meta device; apply_gap_init needs materialised weights (call it before "
                "sharding or offloading the model)."
            )
        check_gap(gap, target.init)
        generator = torch.Generator().manual_seed(sign_key(seed, target.name + "#magnitude") >> 1)
        unit = _unit_magnitudes(target.init, gap, param.numel(), generator)
        magnitude = (unit * (gap_scale(target.init, gap) * target.init.std)).view(param.shape)
        # A magnitude that rounds to zero in the parameter dtype would be a flip at step 0.
        magnitude = magnitude.to(param.dtype).clamp_min(torch.finfo(param.dtype).tiny)
        signs = reference_signs(seed, target.name, param.shape, sign_source, template_rank)
        param.copy_((magnitude * signs).to(param.device))
    return resolved
