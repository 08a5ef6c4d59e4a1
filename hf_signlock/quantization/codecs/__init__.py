"""Magnitude codecs, one per module: ``exact`` (lossless), ``scale`` (rank 1), ``lowrank`` (rank r), ``vq``
(codebooks over groups, for sub-bit budgets), ``signmag`` (grouped scalar levels, calibrated: 2 bits and up)."""

from __future__ import annotations

from ...errors import SignLockConfigError
from .base import FLOOR, FixedSizeCodec, MagnitudeCodec
from .exact import ExactCodec
from .lowrank import LowRankCodec
from .scale import ScaleCodec
from .signmag import SignMagnitudeCodec
from .vq import VectorCodec

CODECS = {codec.name: codec for codec in (ExactCodec, ScaleCodec, LowRankCodec, VectorCodec, SignMagnitudeCodec)}
DEFAULT_CODEC = "vq"


def make_codec(name: str, params: dict | None = None) -> MagnitudeCodec:
    """The codec called ``name`` with the user's ``params`` (unknown names and parameters are refused)."""
    if name not in CODECS:
        raise SignLockConfigError(f"Unknown magnitude codec {name!r}; available: {sorted(CODECS)}.")
    return CODECS[name](**(params or {}))


__all__ = ["CODECS", "DEFAULT_CODEC", "FLOOR", "ExactCodec", "FixedSizeCodec", "LowRankCodec", "MagnitudeCodec",
           "ScaleCodec", "SignMagnitudeCodec", "VectorCodec", "make_codec"]
