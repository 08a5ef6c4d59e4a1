"""Independent twin of ``hf_signlock.seeded_signs`` in pure numpy (uint64 arithmetic, logical shifts).

It shares no code with the torch path: it re-derives the key and the SplitMix64 stream from the documented
algorithm, and extracts bits with shifts instead of the byte table.
"""

import hashlib

import numpy as np


def numpy_key(seed: int, name: str) -> np.uint64:
    digest = hashlib.blake2b(b"hf_signlock/signs/v1\x00" + str(seed).encode() + b"\x00" + name.encode(), digest_size=8)
    return np.uint64(int.from_bytes(digest.digest(), "little"))


def numpy_signs(seed: int, name: str, numel: int, start: int = 0) -> np.ndarray:
    positions = np.arange(start, start + numel, dtype=np.uint64)
    words = positions // np.uint64(64)
    with np.errstate(over="ignore"):
        z = numpy_key(seed, name) + (words + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    bits = (z >> (positions % np.uint64(64))) & np.uint64(1)
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)
