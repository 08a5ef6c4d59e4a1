"""Seeded signs: frozen golden vectors, the numpy twin, slice identity, statistics, processes, devices."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_signs import numpy_signs

from hf_signlock import (
    SignLockConfigError,
    kernels,
    pack_signs,
    seeded_signs,
    sign_key,
    template_signs,
    unpack_signs,
)
from hf_signlock.kernels import signs as sign_kernel
from hf_signlock.signs import generator as signs_module

# (seed, name, start) -> (key, first 64 signs). Frozen: a change here is a new format version, never an edit.
GOLDEN = {
    (0, "model.layers.0.self_attn.q_proj.weight", 0): (
        0x4665E09BDEAAF6E1, "-++-+---+-+-+--++----++-+----+-+--+--+-++++------+-------+++-+++"),
    (42, "transformer.h.3.mlp.c_fc.weight", 1000003): (
        0xCF9F11135689CF05, "+++++-++------+---+-+++-+++-+++++-+++--+--++---+--++-+---+---+--"),
    (-7, "ünïcode.weight", 5): (
        0xA4A3BF8CAECA2231, "+---+---+--+-+--++-++-+-+++++--+--+-+-+--++--++++-+-++--+-+--+++"),
    (2**70 + 1, "w", 64 * 10**9): (
        0x584B9E7A317356C0, "+++-+-+----++--++--+-+----++--+-++++++-+----------++-+++-------+"),
}


def as_text(signs: torch.Tensor) -> str:
    return "".join("+" if s > 0 else "-" for s in signs.tolist())


@pytest.mark.parametrize(("case", "expected"), GOLDEN.items(), ids=lambda c: str(c)[:30])
def test_golden_vectors(case, expected):
    seed, name, start = case
    key, signs = expected
    assert sign_key(seed, name) == key
    assert as_text(seeded_signs(seed, name, 64, start)) == signs
    assert as_text(torch.from_numpy(numpy_signs(seed, name, 64, start))) == signs


@pytest.mark.parametrize("kernel", [True, False], ids=["fused-kernel", "numpy-table"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(-(2**70), 2**70),
    name=st.text(min_size=1, max_size=40),
    numel=st.integers(0, 5000),
    start=st.integers(0, 10**12),
)
def test_cpu_paths_equal_numpy_twin(monkeypatch, kernel, seed, name, numel, start):
    monkeypatch.setattr(signs_module, "USE_SIGN_KERNEL", kernel)
    assert kernels.available()  # numba is a dependency: the fused path must be the one tested here
    assert np.array_equal(seeded_signs(seed, name, numel, start).numpy(), numpy_signs(seed, name, numel, start))


def test_fused_kernel_equals_table_path_on_large_unaligned_tensors(monkeypatch):
    args = (11, "model.layers.1.mlp.down_proj.weight", 3_000_001, 12_345)
    fused = seeded_signs(*args)
    monkeypatch.setattr(signs_module, "USE_SIGN_KERNEL", False)
    assert torch.equal(fused, seeded_signs(*args))


@settings(max_examples=40, deadline=None)
@given(bounds=st.tuples(st.integers(0, 20_000), st.integers(0, 20_000)).map(sorted))
def test_any_slice_equals_the_same_part_of_the_whole(bounds):
    a, b = bounds
    whole = seeded_signs(5, "layer.weight", 20_000)
    assert torch.equal(seeded_signs(5, "layer.weight", b - a, start=a), whole[a:b])


def test_values_and_balance():
    n = 1_000_000
    signs = seeded_signs(1, "w", n)
    assert signs.dtype == torch.int8 and signs.shape == (n,)
    assert set(signs.unique().tolist()) == {-1, 1}
    # Fair coin: |mean| < 4 standard errors; runs of equal signs as for i.i.d. bits (expected n/2 sign changes).
    assert abs(signs.float().mean().item()) < 4 / n**0.5
    changes = (signs[1:] != signs[:-1]).float().mean().item()
    assert abs(changes - 0.5) < 4 * 0.5 / n**0.5
    for other in (seeded_signs(2, "w", n), seeded_signs(1, "w2", n)):
        assert abs((signs == other).float().mean().item() - 0.5) < 4 * 0.5 / n**0.5


def test_same_signs_in_another_process():
    code = "import hashlib;from hf_signlock import seeded_signs;" \
           "print(hashlib.sha256(seeded_signs(9,'a.b',1_000_003,77).numpy().tobytes()).hexdigest())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    assert other == hashlib.sha256(seeded_signs(9, "a.b", 1_000_003, 77).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("seed", [1.5, "3", True, None])
def test_non_integer_seed_is_refused(seed):
    with pytest.raises(SignLockConfigError, match="seed"):
        seeded_signs(seed, "w", 8)


def test_numpy_integer_seed_is_accepted():
    assert torch.equal(seeded_signs(np.int64(4), "w", 100), seeded_signs(4, "w", 100))


def test_template_signs_are_low_rank_and_deterministic():
    rows, cols, rank = 96, 80, 4
    template = template_signs(3, "w", (rows, cols), rank)
    assert template.dtype == torch.int8 and template.shape == (rows, cols)
    assert torch.equal(template, template_signs(3, "w", (rows, cols), rank))
    assert set(template.unique().tolist()) == {-1, 1}

    def top_energy(matrix):
        singular = torch.linalg.svdvals(matrix.double())
        return (singular[:rank] ** 2).sum() / (singular**2).sum()

    iid = seeded_signs(3, "w", rows * cols).view(rows, cols)
    # sign(U V^T) keeps most of its energy in a few directions; an i.i.d. sign matrix spreads it evenly.
    assert top_energy(template) > 0.5 > 2 * top_energy(iid)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000, 4097])
def test_pack_unpack_round_trip(numel):
    signs = seeded_signs(0, "p", numel)
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(unpack_signs(packed, (numel,)), signs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_bit_for_bit():
    for start in (0, 13, 64 * 1000 + 5):
        cpu = seeded_signs(11, "model.layers.1.mlp.down_proj.weight", 3_000_001, start)
        gpu = seeded_signs(11, "model.layers.1.mlp.down_proj.weight", 3_000_001, start, device="cuda")
        assert torch.equal(gpu.cpu(), cpu)
    from hf_signlock import seeded_sign_bits

    assert torch.equal(seeded_sign_bits(1, "b", 999_999, 64, device="cuda").cpu(), seeded_sign_bits(1, "b", 999_999, 64))
    shape = (512, 384)
    assert torch.equal(template_signs(2, "t", shape, 8, device="cuda").cpu(), template_signs(2, "t", shape, 8))


@pytest.mark.parametrize(("first_word", "num_words"), [(0, 1), (3, 100), (10**9, 1000)])
def test_hash_paths_agree(first_word, num_words):
    """The three word generators: torch ops (GPUs; run on the CPU here), numpy and the numba kernel (CPU)."""
    from hf_signlock.signs.generator import _splitmix64_words_numpy, _splitmix64_words_torch

    key = sign_key(6, "x.weight")
    numpy_words = _splitmix64_words_numpy(key, first_word, num_words)
    assert torch.equal(_splitmix64_words_torch(key, first_word, num_words, torch.device("cpu")), numpy_words)
    assert np.array_equal(sign_kernel.seeded_words(key, first_word, num_words), numpy_words.numpy().view(np.uint64))


@pytest.mark.parametrize(("numel", "start"), [(1, 0), (8, 8), (13, 64), (1000, 24), (100_003, 64 * 77 + 8)])
def test_sign_bits_are_the_packed_signs(numel, start):
    from hf_signlock import seeded_sign_bits

    assert torch.equal(seeded_sign_bits(4, "b", numel, start), pack_signs(seeded_signs(4, "b", numel, start)))
    with pytest.raises(ValueError, match="multiple of 8"):
        seeded_sign_bits(4, "b", numel, start + 3)
