"""``scale``: |W| ~ r c^T, the leading singular pair of |W| in bf16: 16 (rows + cols) bits per layer."""

from __future__ import annotations

import torch

from .base import BF16_BITS, FixedSizeCodec
from .lowrank import leading_factors


class ScaleCodec(FixedSizeCodec):
    """One scale per row and one per column (a rank-1 magnitude model)."""

    name = "scale"

    def size_bits(self, shape):
        return BF16_BITS * sum(shape)

    def encode(self, magnitude, params):
        rows, cols = leading_factors(magnitude, 1)  # the Perron pair: one sign throughout, so abs() is exact
        return {"row_scale": rows[:, 0].abs().to(torch.bfloat16), "col_scale": cols[:, 0].abs().to(torch.bfloat16)}

    def decode(self, stored, shape, params):
        return self._floored(torch.outer(stored["row_scale"].float(), stored["col_scale"].float()))

    def stored_specs(self, shape, dtype, params):
        return {"row_scale": ((shape[0],), torch.bfloat16), "col_scale": ((shape[1],), torch.bfloat16)}
