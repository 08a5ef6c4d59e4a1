"""The scalar baselines the calibrated export is compared with: round-to-nearest and GPTQ, signs free.

Both use GPTQ's own quantiser: an asymmetric b-bit min/max grid per group of ``group`` input columns (the range
always holds 0), scale and zero point in fp16 (``b + 32 / group`` bits a weight), with an optional per-group search
over range shrink factors (the MSE clipping search GPTQ offers; the same factors as ``signmag``'s). GPTQ
(Frantar et al. 2022) codes the columns in order, pushing each column's error onto the columns still to come
through the Cholesky factor of the inverse Hessian (damping 1% of the mean diagonal, lazy blocks of 128 columns);
a group's grid is fitted when the group starts, on the error-updated weights. Written for the benchmark from the
paper's algorithm; no code copied.
"""

from __future__ import annotations

import torch

from hf_signlock.quantization.codecs.signmag import CLIP_GRID, gptq_setup


class AsymmetricGrid:
    """b-bit asymmetric min/max grid, per row of a group; ``clip`` searches the range shrink factors."""

    def __init__(self, bits: int, clip: bool = True):
        self.top = 2 ** bits - 1
        self.factors = CLIP_GRID if clip else (1.0,)

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of each row of ``w`` (rows x columns of one group)."""
        best = None
        for factor in self.factors:
            low = w.min(dim=1).values.clamp(max=0) * factor
            high = w.max(dim=1).values.clamp(min=0) * factor
            scale = ((high - low) / self.top).to(torch.float16).float().clamp(min=1e-8)
            zero = torch.round(-low / scale)
            error = (self.quantize(w, scale, zero) - w).square().sum(dim=1)
            if best is None:
                best = [scale, zero, error]
            else:
                better = error < best[2]
                best = [torch.where(better, new, old) for new, old in zip((scale, zero, error), best)]
        return best[0], best[1]

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return scale * (torch.clamp(torch.round(w / scale) + zero, 0, self.top) - zero)


def round_to_nearest(weight: torch.Tensor, grid: AsymmetricGrid, group: int) -> torch.Tensor:
    """Every group rounded to its own grid."""
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[1], group):
        part = weight[:, start:start + group]
        out[:, start:start + group] = grid.quantize(part, *grid.fit(part))
    return out


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: AsymmetricGrid, group: int, block: int = 128,
         damping: float = 0.01) -> torch.Tensor:
    """GPTQ with groups of ``group`` columns; returns the quantised weight."""
    weight, _, inverse = gptq_setup(weight, hessian, damping)  # the codec's own preparation, the same for both
    cols = weight.shape[1]
    out = torch.zeros_like(weight)
    block = group * max(1, block // group)  # whole groups per block: a group's grid is fitted inside one block
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part = weight[:, start:end].clone()
        errors = torch.zeros_like(part)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            if (start + i) % group == 0:
                scale, zero = grid.fit(part[:, i:i + group])
            q = grid.quantize(part[:, i], scale, zero)
            out[:, start + i] = q
            error = (part[:, i] - q) / inv[i, i]
            part[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return out


def group_for(cols: int, bits: int, budget: float) -> int:
    """The smallest group (a multiple of 8, or the whole row) whose fp16 scale and zero keep ``bits`` plus the
    tables within ``budget`` bits a weight."""
    for group in [*range(8, cols, 8), cols]:
        if bits + 32 * -(-cols // group) / cols <= budget:
            return group
    raise ValueError(f"{bits}-bit codes with per-row tables exceed {budget} bits a weight for {cols} columns")
