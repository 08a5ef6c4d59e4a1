"""Magnitude codecs: how a layer's |W| is stored once its signs are known exactly.

A codec turns the magnitude matrix ``|W|`` (rows x cols, as the weight is stored) into named tensors and back.
``encode`` gets the bits the layer may spend on magnitudes (the budget left after its signs) and picks its own
parameters to fit, or uses the ones given; the chosen parameters are returned and stored in the layer's record.
Decoded magnitudes of lossy codecs are clamped to a tiny positive floor, so ``sign(decoded W)`` is always the
stored sign.

* ``exact``: |W| in the weight's own dtype (lossless; for checks).
* ``scale``: rank-1 ``r c^T`` (leading singular pair of |W|), bf16: 16 (rows + cols) bits.
* ``lowrank``: rank-r factors ``A B^T`` in bf16: 16 r (rows + cols) bits, r as large as the budget allows.
* ``vq``: per-row bf16 scales, then groups of ``group`` consecutive row-normalised magnitudes replaced by the
  nearest of ``2**bits`` codewords (k-means, bf16 codebook): ``bits / group`` bits per weight plus the tables.
"""

from __future__ import annotations

import math

import torch

from .bitpack import pack_uint, packed_bytes, unpack_uint
from .errors import SignLockConfigError

_FLOOR = 1e-12  # decoded magnitudes never reach 0: a zero would erase the sign the flips paid for
_BF16 = 16


class MagnitudeCodec:
    name = ""
    allowed: tuple[str, ...] = ()

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.allowed))
        if unknown:
            raise SignLockConfigError(
                f"codec {self.name!r} does not take {unknown}; its parameters are {list(self.allowed) or 'none'}."
            )
        self.params = params

    def choose(self, shape: tuple[int, int], budget_bits: float | None) -> dict:
        """The parameters of one layer: the given ones, or the best that fit ``budget_bits``."""
        return dict(self.params)

    def encode(self, magnitude: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, int], params: dict) -> torch.Tensor:
        raise NotImplementedError

    def stored_specs(self, shape, dtype, params) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each stored tensor, to build empty modules before loading."""
        raise NotImplementedError


class _FixedSizeCodec(MagnitudeCodec):
    """A codec whose size is set by the layer's shape: a budget it cannot meet is an error, not ignored."""

    def size_bits(self, shape) -> int:
        raise NotImplementedError

    def choose(self, shape, budget_bits):
        if budget_bits is not None and self.size_bits(shape) > budget_bits:
            raise SignLockConfigError(
                f"codec {self.name!r} stores {self.size_bits(shape)} bits for a {shape[0]}x{shape[1]} layer, over its "
                f"budget of {budget_bits:.0f}. Drop the bits-per-weight budget, or use 'vq' or 'lowrank', which fit one."
            )
        return {}


class ExactCodec(_FixedSizeCodec):
    name = "exact"

    def size_bits(self, shape):
        return 32 * shape[0] * shape[1]  # at most: fp32 magnitudes

    def encode(self, magnitude, params):
        return {"magnitude": magnitude.contiguous()}

    def decode(self, stored, shape, params):
        return stored["magnitude"]

    def stored_specs(self, shape, dtype, params):
        return {"magnitude": (tuple(shape), dtype)}


def _leading_factors(magnitude: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(magnitude.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


class ScaleCodec(_FixedSizeCodec):
    name = "scale"

    def size_bits(self, shape):
        return _BF16 * sum(shape)

    def encode(self, magnitude, params):
        rows, cols = _leading_factors(magnitude, 1)  # the Perron pair: one sign throughout, so abs() is exact
        return {"row_scale": rows[:, 0].abs().to(torch.bfloat16), "col_scale": cols[:, 0].abs().to(torch.bfloat16)}

    def decode(self, stored, shape, params):
        return torch.outer(stored["row_scale"].float(), stored["col_scale"].float()).clamp_min_(_FLOOR)

    def stored_specs(self, shape, dtype, params):
        return {"row_scale": ((shape[0],), torch.bfloat16), "col_scale": ((shape[1],), torch.bfloat16)}


class LowRankCodec(MagnitudeCodec):
    name = "lowrank"
    allowed = ("rank",)

    def choose(self, shape, budget_bits):
        if "rank" in self.params:
            rank = int(self.params["rank"])
        elif budget_bits is None:
            raise SignLockConfigError("codec 'lowrank' needs `rank` in codec_params or a bits-per-weight budget.")
        else:
            rank = min(int(budget_bits // (_BF16 * sum(shape))), min(shape))
        if rank < 1:
            raise SignLockConfigError(
                f"codec 'lowrank' cannot fit a {shape[0]}x{shape[1]} layer in {budget_bits:.0f} bits: rank 1 needs "
                f"{_BF16 * sum(shape)}. Raise the bits per weight or use 'vq'."
            )
        return {"rank": rank}

    def encode(self, magnitude, params):
        left, right = _leading_factors(magnitude, params["rank"])
        return {"left": left.to(torch.bfloat16).contiguous(), "right": right.to(torch.bfloat16).contiguous()}

    def decode(self, stored, shape, params):
        return (stored["left"].float() @ stored["right"].float().T).clamp_min_(_FLOOR)

    def stored_specs(self, shape, dtype, params):
        r = params["rank"]
        return {"left": ((shape[0], r), torch.bfloat16), "right": ((shape[1], r), torch.bfloat16)}


class VectorCodec(MagnitudeCodec):
    name = "vq"
    allowed = ("bits", "group", "iterations")
    _BITS = (8, 6, 4, 2)  # codebook sizes tried, largest first, when the budget chooses

    @staticmethod
    def _bits(shape, bits: int, group: int) -> int:
        groups = math.ceil(shape[0] * shape[1] / group)
        return 8 * packed_bytes(groups, bits) + _BF16 * ((1 << bits) * group + shape[0])

    def choose(self, shape, budget_bits):
        bits, group = self.params.get("bits"), self.params.get("group")
        extra = {"iterations": int(self.params["iterations"])} if "iterations" in self.params else {}
        if bits and group:
            return {"bits": int(bits), "group": int(group), **extra}
        if budget_bits is None:
            raise SignLockConfigError("codec 'vq' needs `bits` and `group` in codec_params or a bits-per-weight budget.")
        candidates = [int(bits)] if bits else self._BITS
        for b in candidates:
            for g in ([int(group)] if group else range(1, shape[1] + 1)):
                if self._bits(shape, b, g) <= budget_bits:
                    return {"bits": b, "group": g, **extra}
        raise SignLockConfigError(
            f"codec 'vq' cannot fit a {shape[0]}x{shape[1]} layer in {budget_bits:.0f} bits (its codebook and row "
            "scales alone need more). Raise the bits per weight."
        )

    def encode(self, magnitude, params):
        scale = magnitude.float().mean(dim=1).clamp_min(_FLOOR).to(torch.bfloat16)
        vectors = _grouped(magnitude.float() / scale.float()[:, None], params["group"])
        size = 1 << params["bits"]
        codebook, index = _kmeans(vectors, size, params.get("iterations", 25))
        if len(codebook) < size:  # fewer groups than codewords: unused rows keep the stored shape fixed
            codebook = torch.cat([codebook, codebook[-1:].expand(size - len(codebook), -1)])
        return {"row_scale": scale, "codebook": codebook.to(torch.bfloat16),
                "codes": pack_uint(index, params["bits"])}

    def decode(self, stored, shape, params):
        groups = math.ceil(shape[0] * shape[1] / params["group"])
        index = unpack_uint(stored["codes"], params["bits"], groups)
        if int(index.max()) >= stored["codebook"].shape[0]:
            raise ValueError("a vq code points past the codebook")
        flat = stored["codebook"].float()[index].reshape(-1)[: shape[0] * shape[1]]
        return (flat.view(shape) * stored["row_scale"].float()[:, None]).clamp_min_(_FLOOR)

    def stored_specs(self, shape, dtype, params):
        groups = math.ceil(shape[0] * shape[1] / params["group"])
        return {"row_scale": ((shape[0],), torch.bfloat16),
                "codebook": (((1 << params["bits"]), params["group"]), torch.bfloat16),
                "codes": ((packed_bytes(groups, params["bits"]),), torch.uint8)}


def _grouped(matrix: torch.Tensor, group: int) -> torch.Tensor:
    flat = matrix.reshape(-1)
    pad = (-flat.numel()) % group
    if pad:  # the tail group is padded with its last value (decoding drops the padding)
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group)


def _kmeans(vectors: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means, seeded by quantiles of the vector norms (deterministic)."""
    k = min(k, vectors.shape[0])
    order = vectors.norm(dim=1).argsort()
    centroids = vectors[order[torch.linspace(0, len(order) - 1, k).long()]].clone()
    for _ in range(iterations):
        index = torch.cdist(vectors, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, index, vectors)
        counts = torch.bincount(index, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids, torch.cdist(vectors, centroids).argmin(dim=1)


CODECS = {codec.name: codec for codec in (ExactCodec, ScaleCodec, LowRankCodec, VectorCodec)}


def make_codec(name: str, params: dict | None = None) -> MagnitudeCodec:
    if name not in CODECS:
        raise SignLockConfigError(f"Unknown magnitude codec {name!r}; available: {sorted(CODECS)}.")
    return CODECS[name](**(params or {}))
