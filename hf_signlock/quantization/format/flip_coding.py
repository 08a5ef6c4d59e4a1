"""Flip positions coded close to their entropy: Golomb codes of the gaps, split into three streams.

A layer of ``n`` weights with ``k`` flipped signs stores the sorted flip positions as gaps ``g`` (non-flips before
each flip), geometric with ``p = k / n``. A Golomb code with parameter ``m`` writes ``q = g // m`` in unary and
``r = g % m`` in truncated binary; for the best ``m`` its expected length is within 1.2% of ``n * H(p)`` for any p
in [1e-5, 0.3]. A single Golomb bit string must be read codeword after codeword, so the same bits are laid out as
three streams that numpy decodes without a per-flip loop:

* ``unary``: for each flip, ``q`` one-bits then a zero (the zeros mark where each flip's quotient ends);
* ``fixed``: the first ``b - 1`` bits of each remainder's truncated binary code (``b = ceil(log2 m)``);
* ``extra``: the last bit of the remainders that take ``b`` bits (those whose first part is >= ``2**b - m``).

Blob layout (bytes): ``version 1 | varint n | varint k | varint m | varint len(unary) | fixed | unary | extra |
crc32`` (little-endian, bits least-significant first). The CRC covers everything before it, so a corrupted blob is
refused instead of decoding to other positions.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from ...constants import FLIP_CODE_VERSION
from ...errors import CorruptCheckpointError
from .varint import ByteReader, varint

# The stored bits beyond the gaps' Golomb code: version byte, four varints (5 bytes each below 2**35 weights),
# CRC32, and up to 7 padding bits in each of the three streams.
HEADER_BITS = 8 * (1 + 4 * 5 + 4) + 3 * 7


# --- bit streams --------------------------------------------------------------------------------------------------

def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8, copy=False), bitorder="little").tobytes()


def _unpack_bits(data: bytes, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count, bitorder="little")


def _fixed_width_bits(values: np.ndarray, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(0, dtype=np.uint8)
    return ((values[:, None] >> np.arange(width, dtype=np.uint64)) & 1).astype(np.uint8).reshape(-1)


def _fixed_width_values(bits: np.ndarray, width: int, count: int) -> np.ndarray:
    if width == 0:
        return np.zeros(count, dtype=np.uint64)
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    return (bits.reshape(count, width).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


# --- the code -------------------------------------------------------------------------------------------------------

def _remainder_layout(m: int) -> tuple[int, int]:
    """(b - 1, cut): a remainder r < cut takes b - 1 bits, the others b bits (b = ceil(log2 m))."""
    if m == 1:
        return 0, 0  # no remainder at all: the first part is empty and nothing takes an extra bit
    b = (m - 1).bit_length()
    return b - 1, (1 << b) - m


def _split(gaps: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Quotients, first remainder parts, extra bits (for the remainders that have one) and first-part width."""
    width, cut = _remainder_layout(m)
    q, r = np.divmod(gaps, np.uint64(m))
    if m == 1:
        return q, np.zeros_like(r), np.zeros(0, dtype=np.uint64), 0
    coded = np.where(r < cut, r, r + np.uint64(cut))  # truncated binary: long codes are r + cut in b bits
    long = r >= cut
    first = np.where(long, coded >> np.uint64(1), coded)
    return q, first, coded[long] & np.uint64(1), width


def _cost_bits(gaps: np.ndarray, m: int) -> int:
    q, first, extra, width = _split(gaps, m)
    return int(q.sum()) + len(gaps) + width * len(gaps) + len(extra)


def _best_m(gaps: np.ndarray, numel: int) -> int:
    k = len(gaps)
    if k == 0:
        return 1
    p = min(k / numel, 0.5)
    guess = max(1, math.ceil(-math.log(2 - p) / math.log1p(-p))) if p < 0.5 else 1
    candidates = range(max(1, guess - 2), guess + 3)
    return min(candidates, key=lambda m: (_cost_bits(gaps, m), m))


def encode_flips(positions: np.ndarray, numel: int) -> bytes:
    """Code sorted, distinct flat positions in ``[0, numel)``."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.ndim != 1:
        raise ValueError(f"flip positions must be 1-D, got shape {positions.shape}")
    if len(positions) and (positions[0] < 0 or positions[-1] >= numel or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"flip positions must be sorted, distinct and in [0, {numel})")
    gaps = np.diff(positions, prepend=-1).astype(np.uint64) - np.uint64(1)
    m = _best_m(gaps, numel)
    q, first, extra, width = _split(gaps, m)
    unary = np.ones(int(q.sum()) + len(gaps), dtype=np.uint8)
    unary[np.cumsum(q + np.uint64(1)).astype(np.int64) - 1] = 0
    unary_bytes = _pack_bits(unary)
    body = (bytes([FLIP_CODE_VERSION]) + varint(numel) + varint(len(positions)) + varint(m)
            + varint(len(unary_bytes)) + _pack_bits(_fixed_width_bits(first, width)) + unary_bytes
            + _pack_bits(extra))
    return body + zlib.crc32(body).to_bytes(4, "little")


def _read_header(blob: bytes):
    blob = bytes(blob)
    if len(blob) < 5 or zlib.crc32(blob[:-4]) != int.from_bytes(blob[-4:], "little"):
        raise CorruptCheckpointError("flip stream: checksum mismatch (the stored bytes are corrupted or truncated)")
    reader = ByteReader(blob[:-4], "flip stream")
    version = reader.take(1, "version")[0]
    if version != FLIP_CODE_VERSION:
        raise CorruptCheckpointError(
            f"flip stream: format version {version} is not supported (this hf_signlock reads {FLIP_CODE_VERSION}); "
            "upgrade hf_signlock"
        )
    stored_numel, k, m = reader.varint("size"), reader.varint("flip count"), reader.varint("Golomb parameter")
    return reader, stored_numel, k, m


def flip_count(blob: bytes) -> int:
    """The number of flips a stream codes, read from its header (no decoding, no checksum check); an empty stream
    (a layer without flips stores none) codes none."""
    if not len(blob):
        return 0
    reader = ByteReader(bytes(blob[:32]), "flip stream")
    reader.take(1, "version")
    reader.varint("size")
    return reader.varint("flip count")


def decode_flips(blob: bytes, numel: int) -> np.ndarray:
    """Sorted flat flip positions (int64) of a layer of ``numel`` weights; raises CorruptCheckpointError unless the
    blob decodes exactly."""
    reader, stored_numel, k, m = _read_header(blob)
    if stored_numel != numel:
        raise CorruptCheckpointError(f"flip stream: coded for {stored_numel} weights, but the layer has {numel}")
    if k > numel or m < 1 or m > 2 * numel + 2:
        raise CorruptCheckpointError(f"flip stream: impossible header (flips={k}, weights={numel}, m={m})")
    unary_len = reader.varint("unary length")
    if k == 0:  # a layer without flips, the common case: nothing follows (and the array work is a load-time cost)
        if unary_len or not reader.at_end():
            raise CorruptCheckpointError("flip stream: trailing bytes after the last stream")
        return np.zeros(0, dtype=np.int64)
    width, cut = _remainder_layout(m)
    first = _fixed_width_values(_unpack_bits(reader.take((k * width + 7) // 8, "remainder stream"), k * width), width, k)
    unary = _unpack_bits(reader.take(unary_len, "quotient stream"), unary_len * 8)
    ends = np.flatnonzero(unary == 0)[:k]
    if len(ends) != k:
        raise CorruptCheckpointError(f"flip stream: the quotients decode to {len(ends)} flips, the header says {k}")
    if unary_len != ((int(ends[-1]) + 8) // 8 if k else 0):
        raise CorruptCheckpointError("flip stream: the quotient stream's length does not match its flips")
    q = (np.diff(ends, prepend=-1) - 1).astype(np.uint64)
    long = first >= np.uint64(cut) if m > 1 else np.zeros(k, dtype=bool)
    n_extra = int(long.sum())
    extra = _unpack_bits(reader.take((n_extra + 7) // 8, "extra-bit stream"), n_extra).astype(np.uint64)
    if not reader.at_end():
        raise CorruptCheckpointError("flip stream: trailing bytes after the last stream")
    r = first.copy()
    r[long] = ((first[long] << np.uint64(1)) | extra) - np.uint64(cut)
    if m > 1 and np.any(r >= np.uint64(m)):
        raise CorruptCheckpointError("flip stream: a remainder is out of range")
    positions = np.cumsum(q * np.uint64(m) + r + np.uint64(1), dtype=np.uint64).astype(np.int64) - 1
    if k and (positions[-1] >= numel or positions[-1] < 0):
        raise CorruptCheckpointError(f"flip stream: a flip position lies beyond the layer's {numel} weights")
    return positions


def entropy_bits(numel: int, flips: int) -> float:
    """``n * H(k / n)``: the entropy bound the coder is measured against."""
    if flips in (0, numel):
        return 0.0
    p = flips / numel
    return -numel * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
