"""Magnitude codecs: how a layer's |W| is stored once its signs are known exactly.

A codec turns the magnitude matrix ``|W|`` (rows x cols, as the weight is stored) into named tensors and back.
Decoded magnitudes of lossy codecs are clamped to a tiny positive floor, so ``sign(decoded W)`` is always the
stored sign. Each codec reports the bits it stores, counted from the tensors themselves.
"""

from __future__ import annotations

import torch

from .errors import SignLockConfigError

_FLOOR = 1e-12  # decoded magnitudes never reach 0: a zero would erase the sign the flips paid for


class MagnitudeCodec:
    name = ""

    def __init__(self, **params):
        if params:
            raise SignLockConfigError(f"codec {self.name!r} takes no parameters, got {sorted(params)}.")

    def encode(self, magnitude: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def stored_specs(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each stored tensor, to build empty modules before loading."""
        raise NotImplementedError


class ExactCodec(MagnitudeCodec):
    """|W| itself, in the weight's own dtype: lossless, for checks (decoded W equals the trained W bit for bit)."""

    name = "exact"

    def encode(self, magnitude):
        return {"magnitude": magnitude.contiguous()}

    def decode(self, stored, shape):
        return stored["magnitude"]

    def stored_specs(self, shape, dtype):
        return {"magnitude": (tuple(shape), dtype)}


class ScaleCodec(MagnitudeCodec):
    """Rank-1 ``|W| ~ r c^T`` (the leading singular pair of |W|, non-negative), stored in bf16: 16 (rows + cols) bits."""

    name = "scale"

    def encode(self, magnitude):
        u, s, vh = torch.linalg.svd(magnitude.double(), full_matrices=False)
        root = s[0].sqrt()
        rows, cols = (u[:, 0] * root).abs(), (vh[0] * root).abs()  # Perron vector: one sign throughout
        return {"row_scale": rows.to(torch.bfloat16), "col_scale": cols.to(torch.bfloat16)}

    def decode(self, stored, shape):
        rows, cols = stored["row_scale"].float(), stored["col_scale"].float()
        return torch.outer(rows, cols).clamp_min_(_FLOOR)

    def stored_specs(self, shape, dtype):
        return {"row_scale": ((shape[0],), torch.bfloat16), "col_scale": ((shape[1],), torch.bfloat16)}


CODECS = {codec.name: codec for codec in (ExactCodec, ScaleCodec)}


def make_codec(name: str, params: dict | None = None) -> MagnitudeCodec:
    if name not in CODECS:
        raise SignLockConfigError(f"Unknown magnitude codec {name!r}; available: {sorted(CODECS)}.")
    return CODECS[name](**(params or {}))
