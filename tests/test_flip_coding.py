"""Flip-position coder: exact round trips, size within 5% of n * H(p) plus the header, corruption always refused."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_signlock.errors import CorruptCheckpointError
from hf_signlock.quantization.format.flip_coding import HEADER_BITS, decode_flips, encode_flips, entropy_bits


def random_flips(numel: int, rate: float, seed: int) -> np.ndarray:
    return np.flatnonzero(np.random.default_rng(seed).random(numel) < rate)


@settings(max_examples=150, deadline=None)
@given(numel=st.integers(1, 60_000), rate=st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_exact(numel, rate, seed):
    positions = random_flips(numel, rate, seed)
    decoded = decode_flips(encode_flips(positions, numel), numel)
    assert decoded.dtype == np.int64 and np.array_equal(decoded, positions)


@pytest.mark.parametrize("rate", np.geomspace(1e-5, 0.3, 12).tolist())
@pytest.mark.parametrize("numel", [100_000, 2_000_000])
def test_size_within_five_percent_of_entropy_plus_header(numel, rate):
    positions = random_flips(numel, rate, seed=int(rate * 1e9) + numel)
    bits = 8 * len(encode_flips(positions, numel))
    bound = entropy_bits(numel, len(positions))
    assert bits <= 1.05 * bound + HEADER_BITS, (bits, bound)
    if len(positions) > 1000:  # well above the header: the Golomb code itself is within ~1.2% of the bound
        assert bits - HEADER_BITS <= 1.015 * bound


def test_extreme_layouts():
    for positions, numel in [([], 1), ([0], 1), ([], 10**9), ([10**9 - 1], 10**9), (range(4096), 4096)]:
        positions = np.asarray(positions, dtype=np.int64)
        assert np.array_equal(decode_flips(encode_flips(positions, numel), numel), positions)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_any_corruption_is_refused(seed, data):
    numel = 5000
    blob = bytearray(encode_flips(random_flips(numel, 0.02, seed), numel))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptCheckpointError):
        decode_flips(bytes(blob), numel)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_truncation_is_refused(seed, data):
    numel = 5000
    blob = encode_flips(random_flips(numel, 0.02, seed), numel)
    with pytest.raises(CorruptCheckpointError):
        decode_flips(blob[: data.draw(st.integers(0, len(blob) - 1))], numel)


def _resealed(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_consistent_but_wrong_blobs_are_refused():
    numel = 1000
    positions = np.array([3, 10, 500])
    body = encode_flips(positions, numel)[:-4]
    with pytest.raises(CorruptCheckpointError, match="version 7"):
        decode_flips(_resealed(bytes([7]) + body[1:]), numel)
    with pytest.raises(CorruptCheckpointError, match="layer has 999"):
        decode_flips(_resealed(body), 999)
    with pytest.raises(CorruptCheckpointError):  # header says 4 flips (byte 3 = the count varint): sizes disagree
        decode_flips(_resealed(body[:3] + bytes([4]) + body[4:]), numel)
    # Half the positions flipped: m = 1, only the unary stream (10 terminators in 2 bytes); claim 17 flips
    body = encode_flips(np.arange(10), 20)[:-4]
    assert body[:4] == bytes([1, 20, 10, 1])
    with pytest.raises(CorruptCheckpointError, match="decode to 16 flips, the header says 17"):
        decode_flips(_resealed(body[:2] + bytes([17]) + body[3:]), 20)


def test_bad_positions_are_a_value_error():
    for positions in ([5, 3], [1, 1], [-1], [10]):
        with pytest.raises(ValueError, match="sorted, distinct"):
            encode_flips(np.array(positions), 10)
