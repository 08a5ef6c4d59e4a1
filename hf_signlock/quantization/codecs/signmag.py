"""``signmag``: the magnitude of every weight on a small grid of levels, per group of columns, the sign held.

A layer's magnitudes are cut into groups of ``group`` consecutive columns per row; each group has an fp16 scale and
each weight a ``bits``-bit code into the layer's ``2**bits`` fp16 levels, so ``|W|[r, c] ~ levels[code] * scale``.
The levels are Lloyd-Max levels of the magnitudes divided by their group's peak, with the ends fixed at 0 and 1:
the zero level lets a weight the stored sign cannot serve (one whose best value has the other sign, or is tiny)
cost nothing, and the top level puts the group's largest magnitude, scaled, exactly on the grid. Each group's scale
is the peak times the clipping factor, out of ``CLIP_GRID``, with the smallest (Hessian-weighted) squared error.

Given a layer's input Hessian (``calibration.py``), ``encode_with_hessian`` codes the columns one by one as GPTQ
does (Frantar et al. 2022), pushing each column's rounding error onto the columns still to come through the inverse
Hessian, every code constrained to the stored sign: ``q = s * scale * levels[Q(max(s * w, 0) / scale)]``. The error
feedback may leave a weight wanting the other sign; it then gets the zero level, and its sign (the stored one) is
never changed, so an export never adds flips.

Size: ``bits`` per weight for the codes, 16 bits per group for the scales, ``16 * 2**bits`` per layer for the levels.
"""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

from ...errors import BudgetError, CorruptCheckpointError, SignLockConfigError
from ...kernels import matmul as kernel_matmul
from ...kernels import output as kernel_output
from ...kernels import signmag as signmag_kernel
from ..format.bitpack import pack_uint, packed_bytes, unpack_uint, unpack_uint_at
from .base import BF16_BITS, MagnitudeCodec, row_positions

logger = logging.get_logger(__name__)

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(8))  # scale = peak * c: clipping the largest few often pays
MAX_BITS = 8
GROUP_STEP = 8  # groups tried when the budget chooses: multiples of 8 columns (and one group per row)
_LEVEL_SAMPLE = 400_000  # magnitudes the levels are fitted on, at most (seeded)
_LLOYD_ITERATIONS = 25
_GPTQ_BLOCK = 128  # columns whose error is pushed on lazily, in one matrix product (GPTQ's lazy batch)
DAMPING = 0.01  # of the Hessian's mean diagonal, added to it: GPTQ's damping


class SignMagnitudeCodec(MagnitudeCodec):
    """Grouped fp16 scales x per-layer levels with a zero level; calibrated with sign-constrained GPTQ."""

    name = "signmag"
    allowed = ("bits", "group")
    has_kernels = True  # see kernel_operands
    stored_params = ("bits", "group")
    calibrated = True  # quantize_model hands it each layer's input Hessian when calibration data is given

    @staticmethod
    def size_bits(shape, bits: int, group: int) -> int:
        """Bits a ``shape`` layer stores: codes, one fp16 scale per group of each row, the levels."""
        rows, cols = shape
        return 8 * packed_bytes(rows * cols, bits) + BF16_BITS * rows * math.ceil(cols / group) + BF16_BITS * (1 << bits)

    def __init__(self, **params):
        super().__init__(**params)
        bits, group = params.get("bits"), params.get("group")
        if bits is not None and not 1 <= int(bits) <= MAX_BITS or group is not None and int(group) < 1:
            raise SignLockConfigError(f"codec 'signmag' takes bits in 1..{MAX_BITS} and group >= 1, got {params}.")

    def needs_budget(self):
        return not (self.params.get("bits") and self.params.get("group"))

    def choose(self, shape, budget_bits):
        bits, group = self.params.get("bits"), self.params.get("group")
        if bits and group:
            need = self.size_bits(shape, int(bits), int(group))
            if budget_bits is not None and need > budget_bits:
                raise BudgetError(
                    f"codec 'signmag' with {self.params} stores {need} bits for a {shape[0]}x{shape[1]} layer, over "
                    f"its budget of {budget_bits:.0f}. Raise bits_per_weight, or leave bits/group out to fit it."
                )
            return {"bits": int(bits), "group": int(group)}
        if budget_bits is None:
            raise BudgetError("codec 'signmag' needs `bits` and `group` in codec_params or a bits-per-weight budget.")
        cols = shape[1]
        groups = [int(group)] if group else [*range(GROUP_STEP, cols, GROUP_STEP), cols]
        for b in [int(bits)] if bits else range(MAX_BITS, 0, -1):  # more levels first, then the smallest groups
            if self.size_bits(shape, b, groups[-1]) > budget_bits:  # not even the largest group fits these codes
                continue
            for g in groups:
                if self.size_bits(shape, b, g) <= budget_bits:
                    return {"bits": b, "group": g}
        least = self.size_bits(shape, int(bits or 1), int(group or cols))
        raise BudgetError(
            f"codec 'signmag' needs at least {least} bits ({least / (shape[0] * cols):.3f} a weight: 1-bit codes and "
            f"one fp16 scale per row) for a {shape[0]}x{cols} layer, whose budget leaves {max(budget_bits, 0):.0f} "
            "once its signs, bias and records are paid. Raise bits_per_weight."
        )

    def plan(self, layers):
        plan = super().plan(layers)
        budget = sum(b for _, b in layers.values() if b is not None)
        if budget and all(b is not None for _, b in layers.values()) and self.needs_budget():
            plan = self._spend_what_is_left(layers, plan, budget)
            used = sum(self.size_bits(shape, **plan[name]) for name, (shape, _) in layers.items())
            weights = sum(math.prod(shape) for shape, _ in layers.values())
            if (budget - used) / weights > 0.25:  # said, not silently undershot
                logger.warning(
                    f"codec 'signmag' reaches {(budget - used) / weights:.2f} bits per weight below the budget: its "
                    f"largest setting is {MAX_BITS}-bit codes with groups of {GROUP_STEP} columns."
                )
        return plan

    def _spend_what_is_left(self, layers, plan, budget: float) -> dict:
        """A layer's setting is a step, not a dial: the first plan leaves up to a group's scales unused in every layer
        (4.0 bits per parameter of SmolLM2-135M came out at 3.67). Raise every layer's budget by one factor, the
        largest found (bisection) whose plan still fits the total; the layers' shares stay alike."""
        def at(factor):
            return {name: self.choose(shape, factor * share) for name, (shape, share) in layers.items()}

        def used(candidate):
            return sum(self.size_bits(shape, **candidate[name]) for name, (shape, _) in layers.items())

        low, high = 1.0, 2.0
        while high < 64 and used(at(high)) <= budget:
            low, high = high, 2 * high
        for _ in range(16):
            middle = (low + high) / 2
            low, high = (middle, high) if used(at(middle)) <= budget else (low, middle)
        return at(low) if low > 1.0 else plan

    # --- encoding ---------------------------------------------------------------------------------------------------

    def encode(self, magnitude, params):
        magnitude = magnitude.float()
        return self._encode_signed(magnitude, torch.ones_like(magnitude), None, params)

    def encode_with_hessian(self, weight: torch.Tensor, signs: torch.Tensor, hessian: torch.Tensor | None,
                            params: dict) -> dict[str, torch.Tensor]:
        """Code ``weight`` (rows x cols, cols the layer's inputs) with its ``signs`` held (+1/-1), using the input
        Hessian ``hessian`` (cols x cols; None: plain rounding, no error feedback)."""
        return self._encode_signed(weight.float(), signs.float(), hessian, params)

    def _encode_signed(self, weight, signs, hessian, params):
        bits, group = params["bits"], params["group"]
        levels = fit_levels(weight * signs, group, 1 << bits)
        if hessian is None:
            codes, scales = _round_groups(weight, signs, levels, group)
        else:
            codes, scales = _gptq(weight, signs, hessian.float(), levels, group)
        return {"codes": pack_uint(codes, bits), "scales": scales.to(torch.float16), "levels": levels.to(torch.float16)}

    # --- decoding ---------------------------------------------------------------------------------------------------

    def decode(self, stored, shape, params):
        rows, cols = shape
        codes = unpack_uint(stored["codes"], params["bits"], rows * cols).view(rows, cols)
        scale = stored["scales"].float().repeat_interleave(params["group"], dim=1)[:, :cols]
        return self._floored(stored["levels"].float()[codes] * scale)

    def decode_row_magnitudes(self, stored, shape, params, rows):
        rows = rows.to(stored["codes"].device)
        codes = unpack_uint_at(stored["codes"], params["bits"], row_positions(shape[1], rows))
        columns = torch.arange(shape[1], device=rows.device) // params["group"]
        scale = stored["scales"].float()[rows][:, columns]
        return self._floored(stored["levels"].float()[codes] * scale)

    def decode_signed(self, stored, shape, params, sign_bits, dtype):
        if self.floor is None or not kernel_output.usable(sign_bits, *stored.values()):
            return super().decode_signed(stored, shape, params, sign_bits, dtype)
        if stored["levels"].numel() != 1 << params["bits"]:
            raise ValueError("the signmag levels do not have the count its parameters give")
        return signmag_kernel.signmag_decode(stored["codes"], params["bits"], params["group"], stored["levels"],
                                             stored["scales"], sign_bits, shape, self.floor, dtype)

    def kernel_operands(self, stored, shape, params, sign_bits):
        if self.floor is None:  # a signed-table variant (bench/): the kernels assume the floored magnitudes
            return None
        if stored["levels"].numel() != 1 << params["bits"]:  # every code then indexes a level
            raise ValueError("the signmag levels do not have the count its parameters give")
        return kernel_matmul.Operands(kernel_matmul.SIGNMAG, stored["codes"], stored["levels"].float().contiguous(),
                                      stored["scales"].contiguous(), sign_bits, params["bits"], params["group"],
                                      *shape)

    def stored_specs(self, shape, dtype, params):
        rows, cols = shape
        return {"codes": ((packed_bytes(rows * cols, params["bits"]),), torch.uint8),
                "scales": ((rows, math.ceil(cols / params["group"])), torch.float16),
                "levels": ((1 << params["bits"],), torch.float16)}

    def params_from_ints(self, values):
        params = super().params_from_ints(values)
        if not (1 <= params.get("bits", 0) <= MAX_BITS and params.get("group", 0) >= 1):
            raise CorruptCheckpointError(f"a signmag layer record holds impossible parameters {values}")
        return params


# --- levels and scales ------------------------------------------------------------------------------------------------


def _grouped(matrix: torch.Tensor, group: int) -> torch.Tensor:
    """rows x cols -> rows x groups x group, the last group padded with zeros."""
    rows, cols = matrix.shape
    pad = (-cols) % group
    if pad:
        matrix = torch.cat([matrix, matrix.new_zeros(rows, pad)], dim=1)
    return matrix.view(rows, -1, group)


def fit_levels(magnitude: torch.Tensor, group: int, count: int) -> torch.Tensor:
    """Lloyd-Max levels (as fp16 values) of the magnitudes divided by their group's peak, 0 and 1 held fixed."""
    grouped = _grouped(magnitude.clamp(min=0), group)
    peak = grouped.amax(dim=2, keepdim=True)
    sample = (grouped / peak.clamp_min(1e-30))[peak.expand_as(grouped) > 0].reshape(-1)
    if sample.numel() > _LEVEL_SAMPLE:
        sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[:_LEVEL_SAMPLE]]
    levels = torch.linspace(0, 1, count)
    for _ in range(_LLOYD_ITERATIONS if count > 2 and sample.numel() else 0):
        index = torch.bucketize(sample, (levels[1:] + levels[:-1]) / 2)
        sums = torch.zeros(count).index_add_(0, index, sample)
        counts = torch.bincount(index, minlength=count)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
        moved[0], moved[-1] = 0.0, 1.0
        levels = moved.sort().values
    return levels.to(torch.float16).float()  # codes are chosen against the levels as stored


def _nearest(normalised: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(normalised, (levels[1:] + levels[:-1]) / 2)


def _fit_scales(magnitude: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-group scales (as fp16 values) over ``magnitude`` (rows x groups x group): the clipping factor with the
    least squared error, each column weighted by ``importance`` (the Hessian's diagonal) when given."""
    peak = magnitude.amax(dim=-1)
    best_scale = best_error = None
    for factor in CLIP_GRID:
        scale = (peak * factor).to(torch.float16).float().clamp_min(2.0 ** -24)
        error = (levels[_nearest(magnitude / scale[..., None], levels)] * scale[..., None] - magnitude).square_()
        error = (error if importance is None else error * importance).sum(dim=-1)
        if best_scale is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale


def _round_groups(weight, signs, levels, group):
    """Codes and scales by rounding every group to its nearest levels (no error feedback)."""
    rows, cols = weight.shape
    magnitude = _grouped((weight * signs).clamp(min=0), group)
    scales = _fit_scales(magnitude, levels, None)
    codes = _nearest(magnitude / scales[..., None], levels).reshape(rows, -1)[:, :cols]
    return codes, scales


def gptq_setup(weight: torch.Tensor, hessian: torch.Tensor, damping: float = DAMPING):
    """GPTQ's preparation: a copy of ``weight`` with the columns of never-active inputs zeroed, the Hessian's
    diagonal (those inputs counted as 1), and the upper Cholesky factor of the damped Hessian's inverse."""
    weight, hessian = weight.clone().float(), hessian.clone().float()
    dead = torch.diag(hessian) == 0  # inputs that were always zero: their weights do not matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    importance = torch.diag(hessian).clone()
    hessian.diagonal().add_(damping * torch.mean(torch.diag(hessian)))
    return weight, importance, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)


@torch.no_grad()
def _gptq(weight, signs, hessian, levels, group):
    """Sign-constrained GPTQ: codes column by column, each column's error pushed onto the rest through the Cholesky
    factor of the inverse Hessian; a group's scale is fitted when the group starts, on the error-updated weights."""
    rows, cols = weight.shape
    weight, importance, inverse = gptq_setup(weight, hessian)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    scales = torch.zeros(rows, math.ceil(cols / group))
    block = group * max(1, _GPTQ_BLOCK // group)  # a whole number of groups: a group is fitted inside one block
    mids = (levels[1:] + levels[:-1]) / 2
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part, part_signs = weight[:, start:end].clone(), signs[:, start:end]
        errors = torch.zeros_like(part)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group == 0:
                span = slice(i, min(i + group, end - start))
                magnitude = (part[:, span] * part_signs[:, span]).clamp(min=0)
                scale = _fit_scales(magnitude[:, None, :], levels, importance[start:end][span])[:, 0]
                scales[:, column // group] = scale
            sign = part_signs[:, i]
            code = torch.bucketize((part[:, i] * sign).clamp(min=0) / scale, mids)
            codes[:, column] = code
            error = (part[:, i] - sign * levels[code] * scale) / inv[i, i]
            part[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return codes, scales
