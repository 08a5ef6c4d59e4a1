"""Independent reference implementations the tests hold the package to.

``numpy_signs`` is a twin of ``hf_signlock.seeded_signs`` in pure numpy (uint64 arithmetic, logical shifts): it
re-derives the key and the SplitMix64 stream from the documented algorithm and extracts bits with shifts instead of
the byte table. ``plain_outward_drift`` is the regulariser's defining formula in plain torch ops.
"""

import hashlib

import numpy as np
import torch


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


def plain_outward_drift(targets, seed: int, margin: float) -> torch.Tensor:
    """R = mean over all target weights of relu(margin * sigma_l - s0 * w), differentiable by plain autograd."""
    total = sum(t.param.numel() for t in targets)
    return sum(
        torch.relu(margin * t.init_std - torch.from_numpy(numpy_signs(seed, t.name, t.param.numel())).view(t.param.shape)
                   * t.param).sum()
        for t in targets
    ) / total
