"""Compiled CPU kernels (numba) for the two hot loops no library fuses: seeded sign generation and vq decoding.

Each kernel has a plain torch/numpy twin that the tests hold it equal to, bit for bit; callers use the kernel when
``available()`` and the inputs live on the CPU, the twin otherwise (no numba, or another device).
"""

from __future__ import annotations

import functools


@functools.cache
def available() -> bool:
    """Whether numba can be imported (the kernels compile on first use, then load from numba's disk cache)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True
