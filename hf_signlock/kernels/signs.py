"""Fused CPU kernels for seeded signs: hash and expand in one pass over the output (numba, multi-threaded).

Written by hand because no library fuses a counter-based hash with a bit-to-int8 expansion: with numpy the hash
and the expansion each walk memory several times and regenerating a tensor's int8 signs cost 1.1-3.4x a bf16
copy of it; fused, it writes each output byte once (see ``bench/results/signs.md``). The arithmetic is the
format of ``signs.py`` exactly; ``tests/test_signs.py`` holds this path to the independent numpy twin.
``fill_words`` writes the packed words alone (what loading checks signs against): one pass where numpy made
eight. Compiled on first use (about a second, then cached on disk).
"""

from __future__ import annotations

import numpy as np

from ..constants import SPLITMIX_GAMMA, SPLITMIX_MUL1, SPLITMIX_MUL2

_kernels = None  # (fill_signs, fill_words), compiled on first use


def _compile():
    import numba

    gamma, mul1, mul2 = (np.uint64(c) for c in (SPLITMIX_GAMMA, SPLITMIX_MUL1, SPLITMIX_MUL2))
    # Byte -> its 8 signs (bit k -> int8 sign k) packed in one int64; frozen into the compiled code.
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    table = (bits * 2 - 1).astype(np.int8).view(np.int64).reshape(256)
    global word  # a module global, not a closure cell: numba cannot cache kernels that close over jitted functions

    @numba.njit(inline="always")
    def word(key, j):  # word j of the stream: SplitMix64's j-th output
        z = key + np.uint64(j + 1) * gamma
        z = (z ^ (z >> np.uint64(30))) * mul1
        z = (z ^ (z >> np.uint64(27))) * mul2
        return z ^ (z >> np.uint64(31))

    @numba.njit(parallel=True, cache=True, nogil=True)
    def fill_signs(key, first_word, out):  # out: int64[8 * num_words], each int64 = 8 int8 signs
        for j in numba.prange(out.shape[0] // 8):
            z = word(key, first_word + j)
            for b in range(8):
                out[8 * j + b] = table[(z >> np.uint64(8 * b)) & np.uint64(255)]

    @numba.njit(parallel=True, cache=True, nogil=True)
    def fill_words(key, first_word, out):  # out: uint64[num_words], the packed signs themselves
        for j in numba.prange(out.shape[0]):
            out[j] = word(key, first_word + j)

    return fill_signs, fill_words


def _kernel(index: int):
    global _kernels
    if _kernels is None:
        _kernels = _compile()
    return _kernels[index]


def seeded_sign_words(key: int, first_word: int, num_words: int) -> np.ndarray:
    """int8 signs of words ``first_word .. first_word + num_words`` (64 per word) of the stream keyed ``key``."""
    out = np.empty(8 * num_words, dtype=np.int64)
    _kernel(0)(np.uint64(key), first_word, out)
    return out.view(np.int8)


def seeded_words(key: int, first_word: int, num_words: int) -> np.ndarray:
    """The words themselves (uint64, 64 packed signs each): what ``seeded_sign_bits`` slices."""
    out = np.empty(num_words, dtype=np.uint64)
    _kernel(1)(np.uint64(key), first_word, out)
    return out
