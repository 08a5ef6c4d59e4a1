"""Fused CPU decoding of a signmag layer: packed signs x code bits x levels x group scales -> dense weight.

Written by hand for the same reason as ``vq.py``: with torch ops the codes are unpacked through int64 index
tensors (about seven walks over the layer, most of a SmolLM2 load), then gathered, scaled, signed and cast. Here
each row's groups are walked once: a group's ``2 * 2**bits`` signed values are computed once, and every weight is
one table read (code and sign bit as the index), written once; where columns and groups are multiples of 8, eight
weights share one sign byte and one read of their code bits. The arithmetic is the torch path's exactly (float32
product of level and scale, clamp to the floor, times the +-1 sign), and ``tests/test_decode_kernel.py`` holds the
two equal bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from . import output

_kernel = None


def _compile():
    import numba

    # A module global, not a closure cell: numba cannot cache a kernel that closes over another jitted function.
    global decode_row

    @numba.njit(inline="always")
    def decode_row(width, by_eights, codes, group, levels, scales, sign_bits, floor, out, r, table):
        """Row r. ``by_eights`` (columns and group multiples of 8): 8 weights a step, from one sign byte and one
        read of their codes; else each weight's code and sign read on their own."""
        cols = out.shape[1]
        mask = (1 << width) - 1
        first = r * cols
        for g in range(scales.shape[1]):
            for code in range(levels.shape[0]):  # index 2 * code + sign bit -> that signed value
                value = max(levels[code] * scales[r, g], floor)
                table[2 * code], table[2 * code + 1] = -value, value
            start, stop = g * group, min(g * group + group, cols)
            if by_eights:
                for c in range(start, stop, 8):
                    k = first + c
                    signs = np.int64(sign_bits[k >> 3])
                    byte = (k * width) >> 3
                    word = np.int64(0)
                    for b in range(width):
                        word |= np.int64(codes[byte + b]) << (8 * b)
                    for b in range(8):
                        out[r, c + b] = table[(((word >> (b * width)) & mask) << 1) | ((signs >> b) & 1)]
            else:
                for c in range(start, stop):
                    k = first + c
                    offset = k * width
                    pair = np.int64(codes[offset >> 3]) | (np.int64(codes[(offset >> 3) + 1]) << 8)
                    code = (pair >> (offset & 7)) & mask
                    out[r, c] = table[(code << 1) | ((sign_bits[k >> 3] >> (k & 7)) & 1)]

    @numba.njit(parallel=True, cache=True, nogil=True)
    def weights(codes, width, group, levels, scales, sign_bits, floor, out):
        """out[r, c] = sign * max(levels[code] * scales[r, c // group], floor), float32; codes LSB-first, eight
        spare bytes after them. The common widths get their own copy of the row loop (the width a constant there:
        about half the time of the general one)."""
        rows, cols = out.shape
        by_eights = cols % 8 == 0 and group % 8 == 0
        for r in numba.prange(rows):
            table = np.empty(2 * levels.shape[0], dtype=np.float32)
            if not by_eights:
                decode_row(width, False, codes, group, levels, scales, sign_bits, floor, out, r, table)
            elif width == 2:
                decode_row(2, True, codes, group, levels, scales, sign_bits, floor, out, r, table)
            elif width == 3:
                decode_row(3, True, codes, group, levels, scales, sign_bits, floor, out, r, table)
            elif width == 4:
                decode_row(4, True, codes, group, levels, scales, sign_bits, floor, out, r, table)
            else:
                decode_row(width, True, codes, group, levels, scales, sign_bits, floor, out, r, table)

    return weights


def signmag_decode(codes: torch.Tensor, width: int, group: int, levels: torch.Tensor, scales: torch.Tensor,
                   sign_bits: torch.Tensor, shape: tuple[int, int], floor: float, dtype: torch.dtype) -> torch.Tensor:
    """``sign * max(levels[code] * scale, floor)`` of every position, in ``dtype``."""
    global _kernel
    if _kernel is None:
        _kernel = _compile()
    # Only the one-by-one path reads a byte past the last code; the 8-at-a-time path ends on it (no copy: 4 ms a load)
    by_eights = shape[1] % 8 == 0 and group % 8 == 0
    codes = codes.numpy() if by_eights else output.padded_codes(codes, 8)
    return output.decode(_kernel, shape, dtype, codes, width, group,
                         levels.float().contiguous().numpy(), scales.float().contiguous().numpy(), sign_bits.numpy(),
                         np.float32(floor))
