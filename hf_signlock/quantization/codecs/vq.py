"""``vq``: per-row scales times a k-means codebook over groups of row-normalised magnitudes.

Row scales are bf16, 8-bit log-coded (``row_scales="log8"``: uint8 codes plus a bf16 range) or one per layer; each
group of ``group`` consecutive normalised magnitudes is replaced by the nearest of ``2**bits`` codewords (bf16
codebook): ``bits / group`` bits per weight plus the tables. When no codebook of a layer's own fits the budget,
``plan`` shares one across all layers, stored by the first (in name order). On the CPU ``decode_signed`` runs the
fused kernel of ``kernels/vq.py``; elsewhere (CUDA) the same arithmetic runs as torch ops on the tensors' device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.utils import logging

from ...errors import BudgetError, CorruptCheckpointError, SignLockConfigError
from ...kernels import matmul as kernel_matmul
from ...kernels import output as kernel_output
from ...kernels import vq as vq_kernel
from ..format.bitpack import pack_uint, packed_bytes, unpack_uint, unpack_uint_at
from .base import BF16_BITS, FLOOR, MagnitudeCodec, row_positions

logger = logging.get_logger(__name__)

# The budget's own digits are stored (config.json): a longer number than the one that failed costs a few more
# bytes of overhead. The "raise by" of the budget errors allows 8 bytes for it, so that the number printed fits.
_SLACK_BITS = 64


def _rounded_up(bits_per_weight: float) -> str:
    """A shortfall to 3 decimals, rounded up: raising the budget by the number printed is enough."""
    return f"{math.ceil(bits_per_weight * 1000 - 1e-9) / 1000:.3f}"


def _what_is_left(per_weight: float, paid: str) -> str:
    """The magnitudes' share of a budget, in words: what is left per weight once ``paid`` are, or how far over it
    ``paid`` already are."""
    if per_weight >= 0:
        return f"the budget leaves {per_weight:.3f} a weight once {paid} are paid"
    return f"{paid} alone already take {-per_weight:.3f} bits per weight more than the budget"


class VectorCodec(MagnitudeCodec):
    """Row scales x a k-means codebook over groups; parameters chosen per layer to fit the budget."""

    name = "vq"
    allowed = ("bits", "group", "iterations", "row_scales", "shared")
    has_kernels = True  # see kernel_operands
    stored_params = ("bits", "group", "row_scales", "shared", "codebook_owner")
    _BITS = (8, 6, 4, 2, 1)  # codebook sizes tried, largest first, when the budget chooses
    _ROW_SCALES = ("bf16", "log8", "layer")  # tried in this order: the cheaper forms free bits for small budgets
    _SAMPLE = 1 << 16  # groups a codebook is fitted on, at most (a fixed, seeded sample)

    @staticmethod
    def _scale_bits(shape, row_scales: str) -> int:
        return {"bf16": BF16_BITS * shape[0], "log8": 8 * shape[0] + 2 * BF16_BITS, "layer": BF16_BITS}[row_scales]

    @classmethod
    def _bits(cls, shape, bits: int, group: int, row_scales: str = "bf16", codebook: bool = True) -> int:
        groups = math.ceil(shape[0] * shape[1] / group)
        book = BF16_BITS * (1 << bits) * group if codebook else 0
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

    def record_ints(self, params):
        return [params["bits"], params["group"], self._ROW_SCALES.index(params.get("row_scales", "bf16")),
                int(bool(params.get("shared"))), int(bool(params.get("codebook_owner")))]

    def params_from_ints(self, values):
        if len(values) != len(self.stored_params):
            raise CorruptCheckpointError(f"a vq layer record holds {len(values)} parameters, not 5")
        bits, group, row_scales, shared, owner = values
        if not (1 <= bits <= 8 and group >= 1 and row_scales < len(self._ROW_SCALES)):
            raise CorruptCheckpointError(f"a vq layer record holds impossible parameters {values}")
        params = {"bits": bits, "group": group, "row_scales": self._ROW_SCALES[row_scales]}
        if shared:
            params["shared"] = True
        if owner:
            params["codebook_owner"] = True
        return params

    def _extra(self) -> dict:
        return {"iterations": int(self.params["iterations"])} if "iterations" in self.params else {}

    def needs_budget(self):
        return not (self.params.get("bits") and self.params.get("group"))

    def choose(self, shape, budget_bits):
        explicit = self.params.get("bits") and self.params.get("group")
        if budget_bits is None and not explicit:
            raise SignLockConfigError("codec 'vq' needs `bits` and `group` in codec_params or a bits-per-weight budget.")
        for row_scales, b, g in self._candidates(shape):
            if budget_bits is None or self._bits(shape, b, g, row_scales) <= budget_bits:
                return {"bits": b, "group": g, "row_scales": row_scales, **self._extra()}
        weights = shape[0] * shape[1]
        least = min(int(bits.min()) for bits in self._least_bits(shape, codebook=True).values())
        raise BudgetError(
            f"codec 'vq' cannot fit a {shape[0]}x{shape[1]} layer in {budget_bits:.0f} bits with a codebook of its "
            f"own: it needs at least {least} bits ({least / weights:.3f} a weight: codes, row scales and codebook), "
            f"and {_what_is_left(budget_bits / weights, 'its signs, bias and records')}. Raise the bits per weight "
            f"(bits_per_weight) by at least {_rounded_up((least + _SLACK_BITS - budget_bits) / weights)}, or share one "
            "codebook across layers: codec_params {\"shared\": true}."
        )

    def _least_bits(self, shape, codebook: bool) -> dict[int, np.ndarray]:
        """``bits -> array over group (the candidates' groups for a layer as wide as shape)`` of the fewest bits
        a layer of ``shape`` stores with those codes: its cheapest allowed row scales, with or without a codebook.
        For the budget errors, which name the smallest budget that fits."""
        scales = [self.params["row_scales"]] if "row_scales" in self.params else self._ROW_SCALES
        scale_bits = min(self._scale_bits(shape, s) for s in scales if s in self._ROW_SCALES)
        groups = np.array([int(g) for g in self._group_candidates(shape)], dtype=np.int64)
        count = -(-(shape[0] * shape[1]) // groups)
        result = {}
        for b in ([int(self.params["bits"])] if self.params.get("bits") else self._BITS):
            book = BF16_BITS * (1 << b) * groups if codebook else 0
            result[b] = 8 * ((count * b + 7) // 8) + book + scale_bits
        return result

    def _group_candidates(self, shape):
        return [int(self.params["group"])] if self.params.get("group") else range(1, 4 * shape[1] + 1)

    def _shared_shortfall(self, layers) -> tuple[float, float]:
        """(the fewest bits per weight the layers' magnitudes need with one shared codebook, what their budgets
        leave per weight), over the layers that have a budget: for the error of ``_plan_shared``."""
        budgeted = {name: (shape, budget) for name, (shape, budget) in layers.items() if budget is not None}
        total = sum(math.prod(shape) for shape, _ in layers.values())
        widest = max(layers.values(), key=lambda item: item[0][1])[0]
        groups = np.array([int(g) for g in self._group_candidates(widest)], dtype=np.int64)
        left = sum(budget for _, budget in budgeted.values()) / sum(math.prod(s) for s, _ in budgeted.values())
        best = math.inf
        for b in ([int(self.params["bits"])] if self.params.get("bits") else self._BITS):
            # each layer pays its codes and scales and its share of the book: it must fit its own budget
            deficit = np.full(len(groups), -np.inf)
            for shape, budget in budgeted.values():
                count = -(-(shape[0] * shape[1]) // groups)
                scales = [self.params["row_scales"]] if "row_scales" in self.params else self._ROW_SCALES
                own = 8 * ((count * b + 7) // 8) + min(self._scale_bits(shape, s) for s in scales)
                deficit = np.maximum(deficit, (own - budget) / math.prod(shape))
            best = min(best, float((deficit + BF16_BITS * (1 << b) * groups / total).min()))
        return left + best, left

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
            book = BF16_BITS * (1 << b) * g
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
        need, left = self._shared_shortfall(layers)
        total = sum(math.prod(shape) for shape, _ in layers.values())
        raise BudgetError(
            "codec 'vq' cannot fit the budget even with one codebook shared by all layers: their magnitudes need at "
            f"least {need:.3f} bits per weight (codes, row scales and a share of the codebook), and "
            f"{_what_is_left(left, 'the signs, biases and layer records')}. Raise the bits per weight "
            f"(bits_per_weight) by at least {_rounded_up(need - left + _SLACK_BITS / total)}."
        )

    def _normalise(self, magnitude: torch.Tensor, params: dict):
        """Row scales as stored, and the vectors they leave to the codebook."""
        magnitude = magnitude.float()
        mode = params.get("row_scales", "bf16")
        mean = magnitude.abs().mean(dim=1) if mode != "layer" else magnitude.abs().mean().reshape(1)
        mean = mean.clamp_min(FLOOR)
        if mode == "log8":
            log = mean.log()
            bounds = torch.stack([log.min(), log.max()]).to(torch.bfloat16)
            step = (bounds[1].float() - bounds[0].float()) / 255
            code = ((log - bounds[0].float()) / step.clamp_min(FLOOR)).round().clamp_(0, 255).to(torch.uint8)
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

    def encode_all(self, magnitudes, plan, progress=iter):
        if not any(params.get("shared") for params in plan.values()):
            return super().encode_all(magnitudes, plan, progress)
        normalised = {name: self._normalise(magnitudes[name](), plan[name]) for name in progress(plan)}
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

    def decode_row_magnitudes(self, stored, shape, params, rows):
        positions = row_positions(shape[1], rows.to(stored["codes"].device))
        group = params["group"]
        index = unpack_uint_at(stored["codes"], params["bits"], positions // group)
        if index.numel() and int(index.max()) >= stored["codebook"].shape[0]:
            raise ValueError("a vq code points past the codebook")
        scale = self._row_scale(stored).expand(shape[0])[positions[:, 0] // shape[1]]
        return self._floored(stored["codebook"].float()[index, positions % group] * scale[:, None])

    def decode_signed(self, stored, shape, params, sign_bits, dtype):
        if self.floor is None or not kernel_output.usable(sign_bits, *stored.values()):
            return super().decode_signed(stored, shape, params, sign_bits, dtype)
        if stored["codebook"].shape != ((1 << params["bits"]), params["group"]):
            raise ValueError("the vq codebook does not have the shape its parameters give")
        return vq_kernel.vq_decode(stored["codes"], params["bits"], params["group"], stored["codebook"],
                                   self._row_scale(stored), sign_bits, shape, self.floor, dtype)

    def kernel_operands(self, stored, shape, params, sign_bits):
        if self.floor is None:  # a signed-table variant (bench/): the kernels assume the floored magnitudes
            return None
        codebook = stored["codebook"]
        if codebook.dim() != 2 or codebook.shape[1] != params["group"]:
            raise ValueError("the vq codebook does not have the shape its parameters give")
        operands = kernel_matmul.Operands(kernel_matmul.VQ, stored["codes"], codebook.float().contiguous(),
                                          self._row_scale(stored).expand(shape[0]).contiguous(), sign_bits,
                                          params["bits"], params["group"], *shape)
        kernel_matmul.check_codes_in_table(operands)
        largest = operands.table.abs().max().double() * operands.scales.abs().max().double()
        if not torch.isfinite(largest.float()):  # the weights a forward would use: refused now, not as inf logits
            raise ValueError(f"the codebook times the row scales reaches {largest.item():.3g}: infinite in float32")
        return operands

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
