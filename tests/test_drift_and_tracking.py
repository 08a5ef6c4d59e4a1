"""Outward drift equals its defining formula (value and gradient); the flip tracker counts exactly."""

import pytest
import torch
from reference_signs import plain_outward_drift
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_signlock import FlipTracker, SignReference, apply_gap_init, geometric_tail_ratio, outward_drift


@pytest.fixture
def seeded_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    targets = apply_gap_init(model, seed=8, gap=0.5)
    return model, targets


def test_drift_value_and_gradient_equal_the_formula(seeded_model):
    _, targets = seeded_model
    with torch.no_grad():  # move some weights inside the margin and across zero
        for t in targets:
            t.param.mul_(torch.rand(t.param.shape, generator=torch.Generator().manual_seed(1)) * 3 - 1)
    margin = 1.0
    reference = SignReference.from_seed(targets, seed=8)
    params = [t.param for t in targets]
    value = outward_drift(reference, margin)
    grads = torch.autograd.grad(value, params)
    n = sum(p.numel() for p in params)
    plain = plain_outward_drift(targets, seed=8, margin=margin)
    plain_grads = torch.autograd.grad(plain, params)
    assert value.item() == pytest.approx(plain.item(), rel=1e-6)
    for g, expected, t in zip(grads, plain_grads, targets):
        assert torch.equal(g, expected)
        s0 = reference.signs(t)
        inside = s0 * t.param < margin * t.init_std
        assert torch.equal(g, torch.where(inside, -s0.float() / n, torch.zeros(())))
        assert 0 < inside.float().mean() < 1  # both branches exercised


def test_flip_tracker_counts_flips_and_crossings(seeded_model):
    _, targets = seeded_model
    tracker = FlipTracker(SignReference.from_seed(targets, seed=8))
    assert tracker.observe(0)["flip_rate"] == 0.0
    weight = targets[0].param
    positions = [0, 5, 77]
    with torch.no_grad():
        flat = weight.view(-1)
        flat[positions[:2]] *= -1
        flat[positions[2]] = 0.0  # zero counts as flipped
    observed = tracker.observe(10)
    assert observed["flips"] == 3 and observed["flip_rate"] == 3 / tracker.num_weights
    with torch.no_grad():
        flat[positions[:2]] *= -1  # flip two back: they crossed twice, the zero once
    assert tracker.observe(20)["flips"] == 1
    histogram = tracker.crossing_histogram()
    assert histogram == [tracker.num_weights - 3, 1, 2]
    state = tracker.state_dict()
    fresh = FlipTracker(SignReference.from_seed(targets, seed=8))
    fresh.load_state_dict(state, tracker.last_step, tracker.last)
    fresh.observe(30)
    tracker.observe(30)
    assert fresh.crossing_histogram() == tracker.crossing_histogram() and fresh.last == tracker.last


def test_geometric_tail_ratio_golden():
    # S(1..4) = 87, 37, 12, 2 -> r = (37 + 12 + 2) / (87 + 37 + 12 + 2)
    assert geometric_tail_ratio([100, 50, 25, 10, 2]) == pytest.approx(51 / 138)
    assert geometric_tail_ratio([100]) is None
    # An exactly geometric tail recovers its ratio.
    assert geometric_tail_ratio([0] + [int(1e6 * 0.5**k) for k in range(30)]) == pytest.approx(0.5, rel=1e-3)


def test_captured_reference_round_trip(seeded_model):
    _, targets = seeded_model
    captured = SignReference.capture(targets)
    state = captured.state_dict()
    assert all(v.dtype == torch.uint8 for v in state.values())
    assert sum(v.numel() for v in state.values()) == sum((t.param.numel() + 7) // 8 for t in targets)
    with torch.no_grad():
        for t in targets:
            t.param.neg_()
    restored = SignReference.capture(targets)  # now the opposite signs ...
    restored.load_state_dict(state)  # ... until the checkpoint's are loaded
    for t in targets:
        assert torch.equal(restored.signs(t), captured.signs(t))
