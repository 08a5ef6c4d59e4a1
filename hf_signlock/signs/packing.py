"""Signs bit-packed 8 to a byte: how packed signs are stored and checksummed (bit k of byte j is position 8j + k,
1 = +1, least significant bit first; padding bits are 0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """int8 -1/+1 signs (any shape) -> uint8 bits, 8 per byte, bit k of byte j = position 8j + k is +1."""
    flat = (signs.reshape(-1) > 0).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_signs`."""
    numel = int(torch.Size(shape).numel())
    bits = (packed.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    return (bits.reshape(-1)[:numel].to(torch.int8) * 2 - 1).view(*shape)
