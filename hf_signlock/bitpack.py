"""Fixed-width unsigned integers packed into bytes (least-significant bit first), vectorised with numpy."""

from __future__ import annotations

import numpy as np
import torch


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """``values`` (any int dtype, each < 2**width) -> uint8 bytes holding ``width`` bits per value."""
    v = values.reshape(-1).cpu().numpy().astype(np.uint64)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_uint(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    if width in (8, 16) and packed.numel() * 8 >= count * width:  # whole bytes: a view, no bit loop
        dtype = np.uint8 if width == 8 else np.dtype("<u2")
        values = np.frombuffer(packed.cpu().numpy().tobytes(), dtype=dtype, count=count)
        return torch.from_numpy(values.astype(np.int64))
    bits = np.unpackbits(packed.cpu().numpy(), count=count * width, bitorder="little").reshape(count, width)
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    return torch.from_numpy((bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64).astype(np.int64))


def packed_bytes(count: int, width: int) -> int:
    return (count * width + 7) // 8
