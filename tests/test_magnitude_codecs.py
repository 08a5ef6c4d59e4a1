"""Magnitude codecs: stored shapes match their specs, budgets are met, error falls as the budget grows."""

import math

import pytest
import torch

from hf_signlock import BudgetError, SignLockConfigError
from hf_signlock.quantization.codecs import make_codec

SHAPE = (128, 352)


@pytest.fixture(scope="module")
def magnitude():
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(SHAPE[0], 1, generator=g) + 0.5  # row structure, as trained layers have
    return (torch.randn(SHAPE, generator=g).abs() + 0.3) * rows * 0.02


def stored_bits(stored):
    return sum(t.numel() * t.element_size() * 8 for t in stored.values())


def relative_error(codec, magnitude, params):
    stored = codec.encode(magnitude, params)
    specs = codec.stored_specs(SHAPE, magnitude.dtype, params)
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == {k: (tuple(s), d) for k, (s, d) in specs.items()}
    decoded = codec.decode(stored, SHAPE, params)
    assert decoded.shape == SHAPE and (decoded > 0).all()
    return ((decoded - magnitude).norm() / magnitude.norm()).item(), stored_bits(stored)


@pytest.mark.parametrize("name", ["vq", "lowrank"])
def test_budget_is_met_and_error_falls_with_it(magnitude, name):
    codec = make_codec(name)
    numel = math.prod(SHAPE)
    errors = []
    for bpw in ((0.1,) if name == "vq" else ()) + (0.25, 0.5, 1.0):  # lowrank's rank 1 is 0.17 bpw here
        params = codec.choose(SHAPE, bpw * numel)
        error, bits = relative_error(codec, magnitude, params)
        assert bits <= bpw * numel, (bpw, params)
        assert bits >= 0.5 * bpw * numel, (bpw, params)  # the budget is used, not wasted
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_exact_is_lossless(magnitude):
    codec = make_codec("exact")
    assert torch.equal(codec.decode(codec.encode(magnitude, {}), SHAPE, {}), magnitude)


def test_scale_is_the_best_rank_one_fit(magnitude):
    codec = make_codec("scale")
    error, bits = relative_error(codec, magnitude, {})
    assert bits == 16 * sum(SHAPE)
    mean_rows = magnitude.mean(1, keepdim=True).expand(SHAPE)
    assert error < ((mean_rows - magnitude).norm() / magnitude.norm()).item()


def test_vq_explicit_parameters(magnitude):
    codec = make_codec("vq", {"bits": 4, "group": 2})
    params = codec.choose(SHAPE, None)
    error, bits = relative_error(codec, magnitude, params)
    assert params == {"bits": 4, "group": 2, "row_scales": "bf16"}
    assert bits == 4 * math.prod(SHAPE) // 2 + 16 * (16 * 2 + SHAPE[0])


def test_cheaper_row_scales_cost_little_accuracy(magnitude):
    """log8 row scales (8 bits each, log-uniform) are within 2% of bf16 ones; one layer scale loses the rows."""
    errors = {}
    for row_scales in ("bf16", "log8", "layer"):
        codec = make_codec("vq", {"bits": 4, "group": 4, "row_scales": row_scales})
        errors[row_scales], bits = relative_error(codec, magnitude, codec.choose(SHAPE, None))
        assert bits == 4 * math.prod(SHAPE) // 4 + 16 * 16 * 4 + {"bf16": 16 * 128, "log8": 8 * 128 + 32, "layer": 16}[row_scales]
    assert errors["log8"] < 1.02 * errors["bf16"]
    assert errors["layer"] > 1.05 * errors["bf16"]  # measured 1.09: the rows differ by up to 3x here


def test_shared_codebook_fits_budgets_a_codebook_per_layer_cannot():
    codec = make_codec("vq")
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (64, 64), "b": (64, 64), "c": (160, 64)}
    magnitudes = {name: torch.randn(shape, generator=g).abs() * 0.02 + 1e-3 for name, shape in shapes.items()}
    budgets = {name: 0.1 * math.prod(shape) for name, shape in shapes.items()}
    with pytest.raises(BudgetError, match='cannot fit a 64x64 layer .*"shared": true'):
        make_codec("vq", {"shared": False}).plan({n: (shapes[n], budgets[n]) for n in shapes})
    plan = codec.plan({n: (shapes[n], budgets[n]) for n in shapes})
    assert all(p["shared"] for p in plan.values()) and [n for n, p in plan.items() if p.get("codebook_owner")] == ["a"]
    encoded = codec.encode_all({n: (lambda m=m: m) for n, m in magnitudes.items()}, plan)
    assert "codebook" in encoded["a"] and "codebook" not in encoded["b"]
    assert sum(stored_bits(e) for e in encoded.values()) <= sum(budgets.values())
    for name in ("b", "c"):  # owner's codebook share: each other layer stays within its own budget
        assert stored_bits(encoded[name]) <= budgets[name]
        specs = codec.stored_specs(shapes[name], torch.float32, plan[name])
        assert {k: tuple(v.shape) for k, v in encoded[name].items()} == {k: tuple(s) for k, (s, _) in specs.items()}
        decoded = codec.decode({**encoded[name], "codebook": encoded["a"]["codebook"]}, shapes[name], plan[name])
        assert (decoded > 0).all()
        assert (decoded - magnitudes[name]).norm() < (magnitudes[name].mean() - magnitudes[name]).norm() * 1.01


def test_bad_parameters_and_budgets_are_named():
    with pytest.raises(SignLockConfigError, match="does not take \\['rnak'\\]"):
        make_codec("lowrank", {"rnak": 2})
    with pytest.raises(SignLockConfigError, match="rank 1 needs 7680"):
        make_codec("lowrank").choose(SHAPE, 1000)
    with pytest.raises(BudgetError, match="cannot fit a 128x352 layer"):
        make_codec("vq").choose(SHAPE, 0.02 * math.prod(SHAPE))
    with pytest.raises(BudgetError, match="codec 'scale' stores 7680 bits .* over its budget of 5000"):
        make_codec("scale").choose(SHAPE, 5000)  # a fixed-size codec never ignores a budget it cannot meet
    with pytest.raises(SignLockConfigError, match="`row_scales` must be one of"):
        make_codec("vq", {"row_scales": "fp4"}).choose(SHAPE, 1e5)
    with pytest.raises(SignLockConfigError, match="even with one codebook shared"):
        make_codec("vq").plan({"a": (SHAPE, 100.0)})
    with pytest.raises(SignLockConfigError, match="Unknown magnitude codec 'zip'"):
        make_codec("zip")


@pytest.mark.parametrize("width", [1, 2, 3, 4, 7, 8, 12, 16])
def test_bitpack_round_trip(width):
    from hf_signlock.quantization.format.bitpack import pack_uint, packed_bytes, unpack_uint

    values = torch.randint(0, 1 << width, (1001,), generator=torch.Generator().manual_seed(width))
    packed = pack_uint(values, width)
    assert packed.numel() == packed_bytes(1001, width)
    assert torch.equal(unpack_uint(packed, width, 1001), values)
