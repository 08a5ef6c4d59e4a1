"""Seeded reference signs: a counter-based generator with random access.

Algorithm (format version 1; frozen by golden vectors in ``tests/test_signs.py``):

* ``key = int.from_bytes(blake2b(b"hf_signlock/signs/v1\\0" + str(seed) + b"\\0" + name, digest_size=8), "little")``
* 64-bit word ``j`` of a tensor is ``splitmix64(key + (j + 1) * 0x9E3779B97F4A7C15 mod 2**64)``, i.e. the j-th
  output of SplitMix64 (Steele, Lea & Flood 2014) seeded with ``key``; ``splitmix64`` is its finaliser
  ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``.
* The sign at flat position ``i`` is bit ``i % 64`` (least significant first) of word ``i // 64``: 1 -> +1, 0 -> -1.

Positions are row-major over the parameter as stored (for GPT-2's ``Conv1D`` that is its ``[in, out]`` layout).
One hash gives 64 signs, any slice is computed without the rest of the tensor, and every operation is integer
arithmetic, so CPU and GPU agree bit for bit. On the CPU a fused numba kernel (``kernels/signs.py``) hashes and
expands in one pass; without numba, and on other devices, the words are hashed with numpy or torch ops and a
256-row byte table expands them into int8 signs. ``seeded_sign_bits`` returns the packed bits without the
expansion. The tests hold every path to an independent numpy twin.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys

import numpy as np
import torch

from .. import kernels
from ..constants import SIGN_KEY_DOMAIN, SPLITMIX_GAMMA, SPLITMIX_MUL1, SPLITMIX_MUL2
from ..errors import SignLockConfigError
from ..kernels import signs as sign_kernel

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """The signed int64 with the same 64 bits as ``value`` (torch has no usable uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def check_seed(seed) -> int:
    """``seed`` as an int; anything else (a bool, a float, a string) is a ``SignLockConfigError``."""
    # bool is an int subclass but never a meant seed; numpy integers are fine.
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise SignLockConfigError(
            f"`seed` must be an integer, got {seed!r} ({type(seed).__name__}). Pass a whole number such as seed=42."
        )
    return int(seed)


def sign_key(seed: int, name: str) -> int:
    """The 64-bit generator key of parameter ``name`` under ``seed`` (unsigned)."""
    return _sign_key(check_seed(seed), name)


@functools.lru_cache(maxsize=4096)  # the same few hundred names are asked for again and again
def _sign_key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(
        SIGN_KEY_DOMAIN + str(seed).encode() + b"\x00" + name.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def _logical_rshift(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking the sign-extended bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_words(key: int, first_word: int, num_words: int, device: torch.device) -> torch.Tensor:
    """Words ``first_word .. first_word + num_words`` of the stream, as int64 holding the uint64 bits."""
    if device.type == "cpu" and _use_kernel():
        return torch.from_numpy(sign_kernel.seeded_words(key, first_word, num_words).view(np.int64))
    if device.type == "cpu":  # numpy: native uint64 wrap-around and logical shifts, less per-op overhead
        return _splitmix64_words_numpy(key, first_word, num_words)
    return _splitmix64_words_torch(key, first_word, num_words, device)


def _splitmix64_words_numpy(key: int, first_word: int, num_words: int) -> torch.Tensor:
    z = np.arange(first_word + 1, first_word + 1 + num_words, dtype=np.uint64)
    z *= np.uint64(SPLITMIX_GAMMA)
    z += np.uint64(key)
    z ^= z >> np.uint64(30)
    z *= np.uint64(SPLITMIX_MUL1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(SPLITMIX_MUL2)
    z ^= z >> np.uint64(31)
    return torch.from_numpy(z.view(np.int64))


def _splitmix64_words_torch(key: int, first_word: int, num_words: int, device: torch.device) -> torch.Tensor:
    z = torch.arange(first_word + 1, first_word + 1 + num_words, dtype=torch.int64, device=device)
    z.mul_(_as_int64(SPLITMIX_GAMMA)).add_(_as_int64(key))  # int64 multiply and add wrap modulo 2**64
    z ^= _logical_rshift(z, 30)
    z.mul_(_as_int64(SPLITMIX_MUL1))
    z ^= _logical_rshift(z, 27)
    z.mul_(_as_int64(SPLITMIX_MUL2))
    z ^= _logical_rshift(z, 31)
    return z


# HF_SIGNLOCK_SIGN_KERNEL=0 (read at import) forces the table path on the CPU; the tests compare the two.
USE_SIGN_KERNEL = os.environ.get("HF_SIGNLOCK_SIGN_KERNEL", "1") != "0"


def _use_kernel() -> bool:
    return USE_SIGN_KERNEL and kernels.available()


_BYTE_TO_SIGNS: dict[torch.device, torch.Tensor] = {}


def byte_to_signs(device: torch.device) -> torch.Tensor:
    """Table of 256 int64s, each holding the 8 int8 signs of one byte (bit k -> sign k), cached per device."""
    table = _BYTE_TO_SIGNS.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (bits * 2 - 1).to(torch.int8).contiguous().view(torch.int64).view(256).to(device)
        _BYTE_TO_SIGNS[device] = table
    return table


def _check_range(numel: int, start: int) -> None:
    if sys.byteorder != "little":  # words are read as little-endian bytes
        raise RuntimeError("hf_signlock's sign generator needs a little-endian machine.")
    if numel < 0 or start < 0:
        raise ValueError(f"numel and start must be >= 0, got numel={numel}, start={start}.")


def seeded_signs(seed: int, name: str, numel: int, start: int = 0, device=None) -> torch.Tensor:
    """Reference signs (int8, -1/+1) of flat positions ``start .. start + numel`` of parameter ``name``.

    ``name`` is the parameter's name in ``model.named_parameters()``. The result is bit-identical on every device
    and in every process, and any slice equals the same part of the whole tensor's signs.
    """
    _check_range(numel, start)
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = sign_key(seed, name)
    if numel == 0:
        return torch.empty(0, dtype=torch.int8, device=device)
    first_word, offset = divmod(start, 64)
    num_words = (offset + numel + 63) // 64
    if device.type == "cpu" and _use_kernel():
        signs = torch.from_numpy(sign_kernel.seeded_sign_words(key, first_word, num_words))
        return signs if offset == 0 and numel == signs.numel() else signs[offset : offset + numel]
    words = _splitmix64_words(key, first_word, num_words, device)
    # Each byte of a word indexes a table row holding its 8 signs: one gather writes 8 signs.
    signs = byte_to_signs(device).index_select(0, words.view(torch.uint8).to(torch.int32)).view(torch.int8)
    return signs[offset : offset + numel]


def seeded_sign_bits(seed: int, name: str, numel: int, start: int = 0, device=None) -> torch.Tensor:
    """The same signs bit-packed (uint8; bit k of byte j is position ``start + 8j + k``, 1 = +1; padding bits 0),
    i.e. ``pack_signs(seeded_signs(...))`` without the int8 detour. ``start`` must be a multiple of 8."""
    _check_range(numel, start)
    if start % 8:
        raise ValueError(f"seeded_sign_bits needs a byte-aligned start (a multiple of 8), got {start}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    first_word, offset = divmod(start, 64)
    words = _splitmix64_words(sign_key(seed, name), first_word, (offset + numel + 63) // 64, device)
    bits = words.view(torch.uint8)[offset // 8 : offset // 8 + (numel + 7) // 8]
    if numel % 8:
        bits = bits.clone()
        bits[-1] &= (1 << (numel % 8)) - 1
    return bits


def template_signs(seed: int, name: str, shape: tuple[int, int], rank: int, device=None) -> torch.Tensor:
    """Low-rank reference signs ``sign(U @ V.T)`` of a 2-D parameter (the paper's v2 "template" source).

    ``U`` (rows x rank) and ``V`` (cols x rank) hold integers, each the sum of 32 seeded signs (a binomial,
    close to Gaussian). Their products are exact in float64 on every device, so the signs are too; a zero
    dot product counts as +1. Returned as int8, row-major, shape ``shape``.
    """
    if len(shape) != 2:
        raise SignLockConfigError(f"`sign_source='template'` needs 2-D weights; {name!r} has shape {tuple(shape)}.")
    if rank < 1:
        raise SignLockConfigError(f"`template_rank` must be >= 1, got {rank}.")
    rows, cols = shape
    device = torch.device(device) if device is not None else torch.device("cpu")

    def factor(part: str, n: int) -> torch.Tensor:
        bits = seeded_signs(seed, f"{name}#template.{part}", n * rank * 32, device=device)
        return bits.view(n, rank, 32).sum(-1, dtype=torch.int32).to(torch.float64)

    product = factor("U", rows) @ factor("V", cols).T
    return torch.where(product >= 0, 1, -1).to(torch.int8)


def reference_signs(seed: int, name: str, shape, sign_source: str = "seed", template_rank: int = 8, device=None):
    """Reference signs of a whole parameter, shaped like it, from ``sign_source`` ("seed" or "template")."""
    shape = tuple(shape)
    if sign_source == "seed":
        return seeded_signs(seed, name, int(torch.Size(shape).numel()), device=device).view(shape)
    if sign_source == "template":
        return template_signs(seed, name, shape, template_rank, device=device)
    raise SignLockConfigError(f"Unknown `sign_source` {sign_source!r}; use 'seed' or 'template'.")
