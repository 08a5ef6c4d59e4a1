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
    """``kernel(*inputs, out)`` into a fresh float32 ``shape`` array, returned as a tensor of ``dtype``."""
    target = kernel_dtype(dtype)
    weight = float32_target(*shape, target)
    kernel(*inputs, weight)
    return finish(weight, target).to(dtype)


def padded_codes(codes: torch.Tensor, spare: int) -> np.ndarray:
    """The code bytes with ``spare`` zero bytes after them, so a kernel may read whole words past the last code."""
    return np.concatenate([codes.numpy(), np.zeros(spare, np.uint8)])


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel decodes to: float32 or bfloat16 as asked, float32 for anything else (cast after)."""
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def float32_target(rows: int, cols: int, dtype: torch.dtype) -> np.ndarray:
    """Where a kernel writes its float32 weights: the returned tensor's own memory for float32, scratch for bf16."""
    if dtype != torch.bfloat16:
        return np.empty((rows, cols), dtype=np.float32)
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < rows * cols:
        buffer = _local.buffer = np.empty(rows * cols, dtype=np.float32)
    return buffer[:rows * cols].reshape(rows, cols)


def finish(weight: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's float32 ``weight`` as a tensor of ``dtype`` (float32 or bfloat16)."""
    global _to_bf16
    if dtype != torch.bfloat16:
        return torch.from_numpy(weight)
    if _to_bf16 is None:
        _to_bf16 = _compile()
    out = np.empty(weight.shape, dtype=np.uint16)
    _to_bf16(weight.view(np.uint32), out)
    return torch.from_numpy(out).view(torch.bfloat16)


def compiled() -> list:
    """The compiled helpers so far (for the on-disk cache test)."""
    return [] if _to_bf16 is None else [_to_bf16]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether a fused kernel can decode these tensors: numba is there, all on the CPU, none needs gradients."""
    return available() and all(t.device.type == "cpu" and not t.requires_grad for t in tensors)
