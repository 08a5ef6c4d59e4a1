"""The magnitude-codec interface: how a layer's |W| is stored once its signs are known exactly.

A codec turns the magnitude matrix ``|W|`` (rows x cols, as the weight is stored) into named tensors and back.
``plan`` picks each layer's parameters to fit the bits the layer may spend on magnitudes (its budget once signs,
bias and record are paid), or uses the ones given; the chosen parameters go into the layer's record. Decoded
magnitudes of lossy codecs are clamped to a tiny positive floor, so ``sign(decoded W)`` is always the stored sign.

A layer's parameters are stored in its record as a few small integers (``record_ints``): each codec says which.
"""

from __future__ import annotations

import torch

from ...errors import BudgetError, CorruptCheckpointError, SignLockConfigError
from ...signs import unpack_signs

FLOOR = 1e-12  # decoded magnitudes never reach 0: a zero would erase the sign the flips paid for
BF16_BITS = 16


class MagnitudeCodec:
    """Base class of the magnitude codecs (``exact``, ``scale``, ``lowrank``, ``vq``)."""

    name = ""
    allowed: tuple[str, ...] = ()  # parameters a user may give in codec_params
    stored_params: tuple[str, ...] = ()  # parameters a layer's record stores, as non-negative integers
    floor: float | None = FLOOR  # None: the codec stores signed values (the signed-VQ baseline in bench/)
    calibrated = False  # whether encode_with_hessian uses the Hessian (quantize_model collects none otherwise)
    has_kernels = False  # whether its layers compute in the compressed domain on the CPU (``kernel_operands``)

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.allowed))
        if unknown:
            raise SignLockConfigError(
                f"codec {self.name!r} does not take {unknown}; its parameters are {list(self.allowed) or 'none'}."
            )
        self.params = params

    # --- planning ---------------------------------------------------------------------------------------------------

    def choose(self, shape: tuple[int, int], budget_bits: float | None) -> dict:
        """The parameters of one layer: the given ones, or the best that fit ``budget_bits``."""
        return dict(self.params)

    def plan(self, layers: dict[str, tuple[tuple[int, int], float | None]]) -> dict[str, dict]:
        """Parameters of every layer, from ``name -> (shape, budget_bits)``."""
        return {name: self.choose(shape, budget) for name, (shape, budget) in layers.items()}

    def needs_budget(self) -> bool:
        """Whether ``choose`` needs a bits budget (its size is not fixed by the shape and the given parameters)."""
        return False

    # --- the record -------------------------------------------------------------------------------------------------

    def record_ints(self, params: dict) -> list[int]:
        """A layer's parameters as the integers its record stores."""
        return [int(params.get(name, 0)) for name in self.stored_params]

    def params_from_ints(self, values: list[int]) -> dict:
        """Inverse of ``record_ints``."""
        if len(values) != len(self.stored_params):
            raise CorruptCheckpointError(f"a {self.name} layer record holds {len(values)} parameters, not "
                                         f"{len(self.stored_params)}")
        return {name: value for name, value in zip(self.stored_params, values) if value}

    # --- encoding and decoding -----------------------------------------------------------------------------------

    def encode(self, magnitude: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_with_hessian(self, weight: torch.Tensor, signs: torch.Tensor, hessian: torch.Tensor | None,
                            params: dict) -> dict[str, torch.Tensor]:
        """Encode the signed ``weight`` (rows x cols, cols its inputs) whose ``signs`` (+1/-1) are stored, given the
        layer's input Hessian; codecs that use no calibration encode ``|weight|``."""
        return self.encode(weight.abs(), params)

    def encode_all(self, magnitudes: dict, plan: dict[str, dict], progress=iter) -> dict[str, dict[str, torch.Tensor]]:
        """Encode every layer; ``magnitudes`` maps names to callables returning the matrix (made one at a time).
        ``progress`` wraps the iteration over layer names (a progress bar)."""
        return {name: self.encode(magnitudes[name](), plan[name]) for name in progress(plan)}

    def _floored(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded.clamp_min_(self.floor) if self.floor is not None else decoded

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, int], params: dict) -> torch.Tensor:
        """|W| as float32 on the device of ``stored`` (differentiable in the floating tables)."""
        raise NotImplementedError

    def decode_signed(self, stored, shape, params, sign_bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight: ``decode`` times the signs (bit-packed, as ``pack_signs``), in ``dtype``."""
        magnitude = self.decode(stored, shape, params)
        return (unpack_signs(sign_bits.to(magnitude.device), shape).to(magnitude.dtype) * magnitude).to(dtype)

    def decode_rows(self, stored, shape, params, sign_bits: torch.Tensor, rows: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
        """Rows ``rows`` (int64 indices) of the signed weight, ``len(rows) x cols`` in ``dtype``, equal to the same
        rows of ``decode_signed``: what an embedding lookup needs."""
        magnitude = self.decode_row_magnitudes(stored, shape, params, rows)
        return (row_signs(sign_bits, shape[1], rows).to(magnitude.dtype) * magnitude).to(dtype)

    def decode_row_magnitudes(self, stored, shape, params, rows: torch.Tensor) -> torch.Tensor:
        """|W| of rows ``rows`` as float32: cut from the whole ``decode`` unless the codec decodes rows alone."""
        return self.decode(stored, shape, params)[rows]

    def stored_specs(self, shape, dtype, params) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each stored tensor, to build empty modules before loading."""
        raise NotImplementedError

    def kernel_operands(self, stored, shape, params, sign_bits: torch.Tensor):
        """What the compressed-domain kernels read (``kernels.matmul.Operands``), or None: this codec has none and its
        layers decode, then multiply. Raises ``ValueError`` if the tables cannot be what the kernels index."""


def row_positions(cols: int, rows: torch.Tensor) -> torch.Tensor:
    """Flat positions of every weight of rows ``rows`` of a ``? x cols`` matrix, ``len(rows) x cols`` (int64)."""
    return rows.long()[:, None] * cols + torch.arange(cols, device=rows.device)


def row_signs(sign_bits: torch.Tensor, cols: int, rows: torch.Tensor) -> torch.Tensor:
    """int8 -1/+1 signs of rows ``rows`` from bit-packed signs (``pack_signs`` layout): only their bits are read."""
    positions = row_positions(cols, rows.to(sign_bits.device))
    bits = (sign_bits[positions >> 3] >> (positions & 7).to(torch.uint8)) & 1
    return bits.to(torch.int8) * 2 - 1


class FixedSizeCodec(MagnitudeCodec):
    """A codec whose size is set by the layer's shape: a budget it cannot meet is an error, not ignored."""

    def size_bits(self, shape) -> int:
        raise NotImplementedError

    def choose(self, shape, budget_bits):
        if budget_bits is not None and self.size_bits(shape) > budget_bits:
            raise BudgetError(
                f"codec {self.name!r} stores {self.size_bits(shape)} bits for a {shape[0]}x{shape[1]} layer, over its "
                f"budget of {budget_bits:.0f}. Drop the bits-per-weight budget, or use 'vq' or 'lowrank', which fit one."
            )
        return {}
