"""Fused CPU decoding of a vq layer: packed signs x codebook x row scales -> dense weight, in one pass.

Written by hand because no library fuses a bit-packed code gather with a sign bitmap: with torch ops the codes
are unpacked to int64, gathered into a float32 copy, scaled, clamped, multiplied by an int8 sign tensor and cast,
each a walk over the whole layer (the profile of ``bench/bench_load.py`` put most of the load time there). Here
one pass writes each float32 weight once, rows in parallel (a second rounds it to bf16 when asked). The
arithmetic is the torch path's exactly (float32 product, clamp to the floor, times the +-1 sign; bf16 by
round-to-nearest-even), and ``tests/test_decode_kernel.py`` holds the two equal bit for bit. Compiled on first
use (about a second, then cached on disk).
"""

from __future__ import annotations

import numpy as np
import torch

from . import output

_kernels = None


def _compile():
    import numba

    # The helpers are module globals, not closure cells: numba cannot cache a kernel that closes over other jitted
    # functions, and recompiled it in every process (about 2 s on the first load).
    global code_of, sign_of

    @numba.njit(inline="always")
    def code_of(codes, width, mask, j):  # code of group j: ``width`` bits at bit j * width (one spare byte after)
        offset = j * width
        pair = np.int64(codes[offset >> 3]) | (np.int64(codes[(offset >> 3) + 1]) << 8)
        return (pair >> (offset & 7)) & mask

    @numba.njit(inline="always")
    def sign_of(sign_bits, k):  # +1.0 / -1.0 from bit k (1 = +1); multiplying by it is exact
        return np.float32(((sign_bits[k >> 3] >> (k & 7)) & 1) * 2 - 1)

    # Plain 2-D indexing with whole groups in the inner loop, and the sign multiplied in: a row view with a
    # variable-length inner loop measured about 3x slower, and a branch on the (random) sign slower still.
    @numba.njit(parallel=True, cache=True, nogil=True)
    def weights(codes, width, group, codebook, row_scale, sign_bits, floor, out):
        """out[r, c] = sign * max(codebook[code, position] * row_scale[r], floor), float32."""
        rows, cols = out.shape
        mask = (1 << width) - 1
        for r in numba.prange(rows):
            scale = row_scale[r]
            first = r * cols
            j = first // group
            p = first - j * group  # a group may straddle rows: the row starts at position p of group j
            c = 0
            if p:
                code = code_of(codes, width, mask, j)
                c = min(group - p, cols)
                for q in range(c):
                    out[r, q] = max(codebook[code, p + q] * scale, floor) * sign_of(sign_bits, first + q)
                j += 1
            full = (cols - c) // group
            for t in range(full):
                code = code_of(codes, width, mask, j + t)
                base = c + t * group
                for q in range(group):
                    out[r, base + q] = max(codebook[code, q] * scale, floor) * sign_of(sign_bits, first + base + q)
            j += full
            c += full * group
            if c < cols:
                code = code_of(codes, width, mask, j)
                for q in range(cols - c):
                    out[r, c + q] = max(codebook[code, q] * scale, floor) * sign_of(sign_bits, first + c + q)

    return weights


def vq_decode(codes: torch.Tensor, width: int, group: int, codebook: torch.Tensor, row_scale: torch.Tensor,
              sign_bits: torch.Tensor, shape: tuple[int, int], floor: float, dtype: torch.dtype) -> torch.Tensor:
    """``sign * max(codebook[code] * row_scale, floor)`` of every position, in ``dtype`` (float32 or bfloat16)."""
    global _kernels
    if _kernels is None:
        _kernels = _compile()
    codebook = codebook.float().contiguous().numpy()
    scale = row_scale.float().expand(shape[0]).contiguous().numpy()
    return output.decode(_kernels, shape, dtype, output.padded_codes(codes, 1), width, group, codebook, scale,
                         sign_bits.numpy(), np.float32(floor))
