"""Fused CPU kernel for seeded signs: hash and expand in one pass over the output (numba, multi-threaded).

Written by hand because no library fuses a counter-based hash with a bit-to-int8 expansion: with numpy the hash
and the expansion each walk memory several times and regenerating a tensor's int8 signs cost 1.1-3.4x a bf16
copy of it; fused, it writes each output byte once (see ``bench/results/signs.md``). The arithmetic is the
format of ``signs.py`` exactly; ``tests/test_signs.py`` holds this path to the independent numpy twin.
Compiled on first use (about a second, then cached on disk).
"""

from __future__ import annotations

import functools

import numpy as np

from . import signs as _format

_kernel = None


def _compile():
    import numba

    gamma, mul1, mul2 = (np.uint64(c) for c in (_format._GAMMA, _format._MUL1, _format._MUL2))
    # Byte -> its 8 signs (bit k -> int8 sign k) packed in one int64; a global, so numba freezes it into the code.
    table = _format._byte_to_signs(_format.torch.device("cpu")).numpy().copy()

    @numba.njit(parallel=True, cache=True, nogil=True)
    def fill_signs(key, first_word, out):  # out: int64[8 * num_words], each int64 = 8 int8 signs
        for j in numba.prange(out.shape[0] // 8):
            z = key + np.uint64(first_word + j + 1) * gamma
            z = (z ^ (z >> np.uint64(30))) * mul1
            z = (z ^ (z >> np.uint64(27))) * mul2
            z = z ^ (z >> np.uint64(31))
            for b in range(8):
                out[8 * j + b] = table[(z >> np.uint64(8 * b)) & np.uint64(255)]

    return fill_signs


@functools.cache
def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def seeded_sign_words(key: int, first_word: int, num_words: int) -> np.ndarray:
    """int8 signs of words ``first_word .. first_word + num_words`` (64 per word) of the stream keyed ``key``."""
    global _kernel
    if _kernel is None:
        _kernel = _compile()
    out = np.empty(8 * num_words, dtype=np.int64)
    _kernel(np.uint64(key), first_word, out)
    return out.view(np.int8)
