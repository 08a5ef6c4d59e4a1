"""``lowrank``: |W| ~ A B^T with rank-r factors in bf16 (16 r (rows + cols) bits), r as large as the budget allows."""

from __future__ import annotations

import torch

from ...errors import BudgetError, SignLockConfigError
from .base import BF16_BITS, MagnitudeCodec


def leading_factors(magnitude: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A, B`` with ``A B^T`` the best rank-``rank`` approximation of ``magnitude`` (singular values split evenly)."""
    u, s, vh = torch.linalg.svd(magnitude.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


class LowRankCodec(MagnitudeCodec):
    """Rank-r factors of |W|; the rank is given (``rank``) or the largest that fits the budget."""

    name = "lowrank"
    allowed = ("rank",)
    stored_params = ("rank",)

    def needs_budget(self):
        return "rank" not in self.params

    def choose(self, shape, budget_bits):
        if "rank" in self.params:
            rank = int(self.params["rank"])
        elif budget_bits is None:
            raise SignLockConfigError("codec 'lowrank' needs `rank` in codec_params or a bits-per-weight budget.")
        else:
            rank = min(int(budget_bits // (BF16_BITS * sum(shape))), min(shape))
        if rank < 1:
            raise BudgetError(
                f"codec 'lowrank' cannot fit a {shape[0]}x{shape[1]} layer in {budget_bits:.0f} bits: rank 1 needs "
                f"{BF16_BITS * sum(shape)}. Raise the bits per weight or use 'vq'."
            )
        return {"rank": rank}

    def encode(self, magnitude, params):
        left, right = leading_factors(magnitude, params["rank"])
        return {"left": left.to(torch.bfloat16).contiguous(), "right": right.to(torch.bfloat16).contiguous()}

    def decode(self, stored, shape, params):
        return self._floored(stored["left"].float() @ stored["right"].float().T)

    def stored_specs(self, shape, dtype, params):
        r = params["rank"]
        return {"left": ((shape[0], r), torch.bfloat16), "right": ((shape[1], r), torch.bfloat16)}
