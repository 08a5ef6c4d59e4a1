"""Magnitude codecs: how a layer's |W| is stored once its signs are known exactly.

A codec turns the magnitude matrix ``|W|`` (rows x cols, as the weight is stored) into named tensors and back.
``encode`` gets the bits the layer may spend on magnitudes (the budget left after its signs) and picks its own
parameters to fit, or uses the ones given; the chosen parameters are returned and stored in the layer's record.
Decoded magnitudes of lossy codecs are clamped to a tiny positive floor, so ``sign(decoded W)`` is always the
stored sign.

* ``exact``: |W| in the weight's own dtype (lossless; for checks).
* ``scale``: rank-1 ``r c^T`` (leading singular pair of |W|), bf16: 16 (rows + cols) bits.
* ``lowrank``: rank-r factors ``A B^T`` in bf16: 16 r (rows + cols) bits, r as large as the budget allows.
* ``vq``: row scales (bf16, 8-bit log-coded, or one per layer), then groups of ``group`` consecutive row-normalised
  magnitudes replaced by the nearest of ``2**bits`` codewords (k-means, bf16 codebook): ``bits / group`` bits per
  weight plus the tables. When no codebook of a layer's own fits, ``plan`` shares one across all layers, stored by
  the first; on the CPU ``decode_signed`` runs the fused kernel of ``decode_kernel.py``.
"""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

from . import decode_kernel
from .bitpack import pack_uint, packed_bytes, unpack_uint
from .errors import SignLockConfigError
from .reference import unpack_signs

_FLOOR = 1e-12  # decoded magnitudes never reach 0: a zero would erase the sign the flips paid for
_BF16 = 16
logger = logging.get_logger(__name__)


class MagnitudeCodec:
    name = ""
    allowed: tuple[str, ...] = ()
    floor: float | None = _FLOOR  # None: the codec stores signed values (the signed-VQ baseline in bench/)

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

    def plan(self, layers: dict[str, tuple[tuple[int, int], float | None]]) -> dict[str, dict]:
        """Parameters of every layer, from ``name -> (shape, budget_bits)``."""
        return {name: self.choose(shape, budget) for name, (shape, budget) in layers.items()}

    def encode(self, magnitude: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_all(self, magnitudes: dict, plan: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
        """Encode every layer; ``magnitudes`` maps names to callables returning the matrix (made one at a time)."""
        return {name: self.encode(magnitudes[name](), params) for name, params in plan.items()}

    def _floored(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded.clamp_min_(self.floor) if self.floor is not None else decoded

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, int], params: dict) -> torch.Tensor:
        raise NotImplementedError

    def decode_signed(self, stored, shape, params, sign_bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight: ``decode`` times the signs (bit-packed, as ``pack_signs``), in ``dtype``."""
        magnitude = self.decode(stored, shape, params)
        return (unpack_signs(sign_bits.to(magnitude.device), shape).to(magnitude.dtype) * magnitude).to(dtype)

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
        return self._floored(torch.outer(stored["row_scale"].float(), stored["col_scale"].float()))

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
        return self._floored(stored["left"].float() @ stored["right"].float().T)

    def stored_specs(self, shape, dtype, params):
        r = params["rank"]
        return {"left": ((shape[0], r), torch.bfloat16), "right": ((shape[1], r), torch.bfloat16)}


class VectorCodec(MagnitudeCodec):
    name = "vq"
    allowed = ("bits", "group", "iterations", "row_scales", "shared")
    _BITS = (8, 6, 4, 2, 1)  # codebook sizes tried, largest first, when the budget chooses
    _ROW_SCALES = ("bf16", "log8", "layer")  # tried in this order: the cheaper forms free bits for small budgets
    _SAMPLE = 1 << 16  # groups a codebook is fitted on, at most (a fixed, seeded sample)

    @staticmethod
    def _scale_bits(shape, row_scales: str) -> int:
        return {"bf16": _BF16 * shape[0], "log8": 8 * shape[0] + 2 * _BF16, "layer": _BF16}[row_scales]

    @classmethod
    def _bits(cls, shape, bits: int, group: int, row_scales: str = "bf16", codebook: bool = True) -> int:
        groups = math.ceil(shape[0] * shape[1] / group)
        book = _BF16 * (1 << bits) * group if codebook else 0
        return 8 * packed_bytes(groups, bits) + book + cls._scale_bits(shape, row_scales)

    def _candidates(self, shape):
        """(row_scales, bits, group) in order of preference: given parameters are fixed, the rest searched."""
        scales = [self.params["row_scales"]] if "row_scales" in self.params else self._ROW_SCALES
        bits = [int(self.params["bits"])] if self.params.get("bits") else self._BITS
        groups = [int(self.params["group"])] if self.params.get("group") else range(1, 4 * shape[1] + 1)
        for row_scales in scales:
            if row_scales not in self._ROW_SCALES:
                raise SignLockConfigError(f"vq `row_scales` must be one of {self._ROW_SCALES}, got {row_scales!r}.")
            for b in bits:
                for g in groups:
                    yield row_scales, b, g

    def _extra(self) -> dict:
        return {"iterations": int(self.params["iterations"])} if "iterations" in self.params else {}

    def choose(self, shape, budget_bits):
        explicit = self.params.get("bits") and self.params.get("group")
        if budget_bits is None and not explicit:
            raise SignLockConfigError("codec 'vq' needs `bits` and `group` in codec_params or a bits-per-weight budget.")
        for row_scales, b, g in self._candidates(shape):
            if budget_bits is None or self._bits(shape, b, g, row_scales) <= budget_bits:
                return {"bits": b, "group": g, "row_scales": row_scales, **self._extra()}
        raise SignLockConfigError(
            f"codec 'vq' cannot fit a {shape[0]}x{shape[1]} layer in {budget_bits:.0f} bits with a codebook of its "
            "own. Raise the bits per weight, or share one codebook across layers: codec_params {\"shared\": true}."
        )

    def plan(self, layers):
        shared = self.params.get("shared")
        if not shared:
            try:
                return super().plan(layers)
            except SignLockConfigError:
                if shared is False or any(budget is None for _, budget in layers.values()):
                    raise
                logger.info("vq: per-layer codebooks do not fit the budget; sharing one codebook across layers")
        return self._plan_shared(layers)

    def _plan_shared(self, layers):
        """One codebook for every layer, stored by the first (in name order): its bits are charged to each layer
        in proportion to its weights, so every layer's share of the total stays within its budget."""
        total = sum(math.prod(shape) for shape, _ in layers.values())
        widest = max(layers.values(), key=lambda item: item[0][1])[0]
        owner = min(layers)
        seen = set()
        for _, b, g in self._candidates(widest):
            if (b, g) in seen:
                continue
            seen.add((b, g))
            book = _BF16 * (1 << b) * g
            plan = {}
            for name, (shape, budget) in layers.items():
                share = book * math.prod(shape) / total
                fits = [s for s in self._ROW_SCALES if self.params.get("row_scales", s) == s and
                        (budget is None or self._bits(shape, b, g, s, codebook=False) + share <= budget)]
                if not fits:
                    break
                plan[name] = {"bits": b, "group": g, "row_scales": fits[0], "shared": True, **self._extra()}
            else:
                plan[owner]["codebook_owner"] = True
                return plan
        raise SignLockConfigError(
            "codec 'vq' cannot fit the budget even with one codebook shared by all layers (the codes, the layer "
            "scales and the layer records alone need more). Raise the bits per weight."
        )

    def _normalise(self, magnitude: torch.Tensor, params: dict):
        """Row scales as stored, and the vectors they leave to the codebook."""
        magnitude = magnitude.float()
        mode = params.get("row_scales", "bf16")
        mean = magnitude.abs().mean(dim=1) if mode != "layer" else magnitude.abs().mean().reshape(1)
        mean = mean.clamp_min(_FLOOR)
        if mode == "log8":
            log = mean.log()
            bounds = torch.stack([log.min(), log.max()]).to(torch.bfloat16)
            step = (bounds[1].float() - bounds[0].float()) / 255
            code = ((log - bounds[0].float()) / step.clamp_min(_FLOOR)).round().clamp_(0, 255).to(torch.uint8)
            stored = {"row_scale_code": code, "row_scale_range": bounds}
        else:
            stored = {"row_scale": mean.to(torch.bfloat16)}
        scale = self._row_scale(stored)
        return stored, _grouped(magnitude / scale[:, None], params["group"])

    @staticmethod
    def _stores_codebook(params) -> bool:
        """A layer's own codebook, or the shared one it stores for the others."""
        return not params.get("shared") or bool(params.get("codebook_owner"))

    @staticmethod
    def _row_scale(stored) -> torch.Tensor:
        if "row_scale" in stored:
            return stored["row_scale"].float()
        low, high = stored["row_scale_range"].float()
        return (low + stored["row_scale_code"].float() * ((high - low) / 255)).exp()

    def _finish(self, stored, codebook, index, params):
        size = 1 << params["bits"]
        if len(codebook) < size:  # fewer groups than codewords: unused rows keep the stored shape fixed
            codebook = torch.cat([codebook, codebook[-1:].expand(size - len(codebook), -1)])
        stored["codes"] = pack_uint(index, params["bits"])
        if self._stores_codebook(params):
            stored["codebook"] = codebook.to(torch.bfloat16)
        return stored

    def _fit(self, vectors: torch.Tensor, params: dict) -> torch.Tensor:
        """k-means codebook, fitted on a seeded sample of at most ``_SAMPLE`` groups (then every group is assigned
        once): export time stays flat in the layer's size."""
        if len(vectors) > self._SAMPLE:
            pick = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[: self._SAMPLE]
            vectors = vectors[pick]
        codebook = _kmeans(vectors, 1 << params["bits"], params.get("iterations", 25))
        return codebook.to(torch.bfloat16).float()  # groups are assigned against the codebook as stored

    def encode(self, magnitude, params):
        stored, vectors = self._normalise(magnitude, params)
        codebook = self._fit(vectors, params)
        return self._finish(stored, codebook, _nearest(vectors, codebook), params)

    def encode_all(self, magnitudes, plan):
        if not any(params.get("shared") for params in plan.values()):
            return super().encode_all(magnitudes, plan)
        normalised = {name: self._normalise(magnitudes[name](), params) for name, params in plan.items()}
        codebook = self._fit(torch.cat([v for _, v in normalised.values()]), next(iter(plan.values())))
        return {name: self._finish(stored, codebook, _nearest(v, codebook), plan[name])
                for name, (stored, v) in normalised.items()}

    def decode(self, stored, shape, params):
        groups = math.ceil(shape[0] * shape[1] / params["group"])
        index = unpack_uint(stored["codes"], params["bits"], groups)
        if int(index.max()) >= stored["codebook"].shape[0]:
            raise ValueError("a vq code points past the codebook")
        flat = stored["codebook"].float()[index].reshape(-1)[: shape[0] * shape[1]]
        return self._floored(flat.view(shape) * self._row_scale(stored)[:, None])

    def decode_signed(self, stored, shape, params, sign_bits, dtype):
        if dtype in (torch.float32, torch.bfloat16) and decode_kernel.usable(sign_bits, *stored.values()) \
                and self.floor is not None:
            if stored["codebook"].shape != ((1 << params["bits"]), params["group"]):
                raise ValueError("the vq codebook does not have the shape its parameters give")
            return decode_kernel.vq_decode(stored["codes"], params["bits"], params["group"], stored["codebook"],
                                           self._row_scale(stored), sign_bits, shape, self.floor, dtype)
        return super().decode_signed(stored, shape, params, sign_bits, dtype)

    def stored_specs(self, shape, dtype, params):
        groups = math.ceil(shape[0] * shape[1] / params["group"])
        mode = params.get("row_scales", "bf16")
        if mode == "log8":
            specs = {"row_scale_code": ((shape[0],), torch.uint8), "row_scale_range": ((2,), torch.bfloat16)}
        else:
            specs = {"row_scale": ((shape[0] if mode == "bf16" else 1,), torch.bfloat16)}
        specs["codes"] = ((packed_bytes(groups, params["bits"]),), torch.uint8)
        if self._stores_codebook(params):
            specs["codebook"] = (((1 << params["bits"]), params["group"]), torch.bfloat16)
        return specs


def _grouped(matrix: torch.Tensor, group: int) -> torch.Tensor:
    flat = matrix.reshape(-1)
    pad = (-flat.numel()) % group
    if pad:  # the tail group is padded with its last value (decoding drops the padding)
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group)


def _kmeans(vectors: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """Lloyd's k-means, seeded by quantiles of the vector norms (deterministic)."""
    k = min(k, vectors.shape[0])
    order = vectors.norm(dim=1).argsort()
    centroids = vectors[order[torch.linspace(0, len(order) - 1, k).long()]].clone()
    for _ in range(iterations):
        index = _nearest(vectors, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, index, vectors)
        counts = torch.bincount(index, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids  # assignments are made by the caller, against the codebook as stored


def _nearest(vectors: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest centroid of each vector, in chunks (a full distance matrix can be gigabytes)."""
    return torch.cat([torch.cdist(part, centroids).argmin(dim=1) for part in vectors.split(chunk)])


CODECS = {codec.name: codec for codec in (ExactCodec, ScaleCodec, LowRankCodec, VectorCodec)}


def make_codec(name: str, params: dict | None = None) -> MagnitudeCodec:
    if name not in CODECS:
        raise SignLockConfigError(f"Unknown magnitude codec {name!r}; available: {sorted(CODECS)}.")
    return CODECS[name](**(params or {}))
