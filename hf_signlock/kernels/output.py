"""What the fused decode kernels share: where they write, how a float32 result becomes bfloat16, and when they run.

Each kernel writes float32 weights in one pass; a bf16 load then rounds them to nearest even, exactly as torch casts
float32 to bfloat16, in a second compiled pass (through a per-thread float32 scratch buffer, so a load that decodes
layer after layer does not fault in a fresh one per layer).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from . import available

_to_bf16 = None  # compiled on first use
_local = threading.local()


def _compile():
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def to_bf16(bits, out):
        """Round to nearest even, as torch casts float32 to bfloat16 (``out``: uint16 bits)."""
        rows, cols = bits.shape
        for r in numba.prange(rows):
            for c in range(cols):
                b = bits[r, c]
                out[r, c] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)

    return to_bf16


def decode(kernel, shape: tuple[int, int], dtype: torch.dtype, *inputs) -> torch.Tensor:
    """``kernel(*inputs, out)`` into a float32 ``shape`` array, returned as a tensor of ``dtype``: float32 and
    bfloat16 directly (bf16 through the scratch buffer and the rounding pass), anything else cast after."""
    global _to_bf16
    rows, cols = shape
    if dtype != torch.bfloat16:
        weight = np.empty((rows, cols), dtype=np.float32)
        kernel(*inputs, weight)
        return torch.from_numpy(weight).to(dtype)
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < rows * cols:
        buffer = _local.buffer = np.empty(rows * cols, dtype=np.float32)
    weight = buffer[:rows * cols].reshape(rows, cols)
    kernel(*inputs, weight)
    if _to_bf16 is None:
        _to_bf16 = _compile()
    out = np.empty((rows, cols), dtype=np.uint16)
    _to_bf16(weight.view(np.uint32), out)
    return torch.from_numpy(out).view(torch.bfloat16)


def padded_codes(codes: torch.Tensor, spare: int) -> np.ndarray:
    """The code bytes with ``spare`` zero bytes after them, so a kernel may read whole words past the last code."""
    return np.concatenate([codes.numpy(), np.zeros(spare, np.uint8)])


def compiled() -> list:
    """The compiled helpers so far (for the on-disk cache test)."""
    return [] if _to_bf16 is None else [_to_bf16]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether a fused kernel can decode these tensors: numba is there, all on the CPU, none needs gradients."""
    return available() and all(t.device.type == "cpu" and not t.requires_grad for t in tensors)
