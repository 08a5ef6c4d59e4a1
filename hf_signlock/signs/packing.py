"""Signs bit-packed 8 to a byte: how packed signs are stored and checksummed (bit k of byte j is position 8j + k,
1 = +1, least significant bit first; padding bits are 0)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pack_bits(positive: torch.Tensor) -> torch.Tensor:
    """Booleans (any shape) -> uint8 bits on their device, 8 per byte, bit k of byte j = position 8j + k. On the CPU
    through numpy's packbits, one pass (the torch ops make several, with a uint8 copy and a product)."""
    flat = positive.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    flat = torch.nn.functional.pad(flat.to(torch.uint8), (0, (-flat.numel()) % 8))
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """int8 -1/+1 signs (any shape) -> uint8 bits, 8 per byte, bit k of byte j = position 8j + k is +1."""
    return pack_bits(signs > 0)


def unpack_signs(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_signs`."""
    numel = int(torch.Size(shape).numel())
    bits = (packed.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    return (bits.reshape(-1)[:numel].to(torch.int8) * 2 - 1).view(*shape)
