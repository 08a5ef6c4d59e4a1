"""Fixed-width unsigned integers packed into bytes (least-significant bit first)."""

from __future__ import annotations

import numpy as np
import torch


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """``values`` (any int dtype, each < 2**width) -> uint8 bytes holding ``width`` bits per value (on the CPU)."""
    v = values.reshape(-1).cpu().numpy().astype(np.uint64)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_uint(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first ``count`` values of ``packed`` (int64, on ``packed``'s device). Widths up to 8 bits are gathered
    with torch ops, so codes decode where they are stored (a value spans at most two bytes)."""
    if packed.numel() * 8 < count * width:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} values of {width} bits")
    if width <= 8:
        return unpack_uint_at(packed, width, torch.arange(count, device=packed.device, dtype=torch.int64))
    bits = np.unpackbits(packed.cpu().numpy(), count=count * width, bitorder="little").reshape(count, width)
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    values = (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64).astype(np.int64)
    return torch.from_numpy(values).to(packed.device)


def unpack_uint_at(packed: torch.Tensor, width: int, index: torch.Tensor) -> torch.Tensor:
    """The values at positions ``index`` (int64, any shape) of ``packed`` (``width`` <= 8 bits each; int64, on
    ``packed``'s device): a gather of the one or two bytes each value spans, nothing else unpacked."""
    if width == 8:
        return packed[index].long()
    offset = index * width
    padded = torch.cat([packed, packed.new_zeros(1)]).long()
    pair = padded[offset >> 3] | (padded[(offset >> 3) + 1] << 8)
    return (pair >> (offset & 7)) & ((1 << width) - 1)


def packed_bytes(count: int, width: int) -> int:
    """Bytes that ``count`` values of ``width`` bits take."""
    return (count * width + 7) // 8
