"""``exact``: |W| stored as is, in the weight's own dtype. Lossless; for checks and for references."""

from __future__ import annotations

from .base import FixedSizeCodec


class ExactCodec(FixedSizeCodec):
    """Stores |W| unchanged; the decoded weight equals the trained one bit for bit."""

    name = "exact"

    def size_bits(self, shape):
        return 32 * shape[0] * shape[1]  # at most: fp32 magnitudes

    def encode(self, magnitude, params):
        return {"magnitude": magnitude.contiguous()}

    def decode(self, stored, shape, params):
        return stored["magnitude"]

    def stored_specs(self, shape, dtype, params):
        return {"magnitude": (tuple(shape), dtype)}
