"""Outward drift equals its defining formula (value and gradient); the flip tracker counts exactly."""

import pytest
import torch
from reference_signs import plain_outward_drift
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_signlock import (
    FlipTracker,
    SignReference,
    apply_gap_init,
    geometric_tail_ratio,
    outward_drift,
    resolve_targets,
)
from hf_signlock.training.drift import margin_share


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


def _pretrained_like(scales):
    """A tiny Llama whose target weights are N(0, std_l^2) with a known, different std per layer (far from the
    config's initializer_range, as in a pretrained model)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, initializer_range=0.02)
    model = AutoModelForCausalLM.from_config(config)
    targets = resolve_targets(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t, std in zip(targets, scales):
            t.param.copy_(torch.randn(t.param.shape, generator=generator) * std)
    return model, targets


def test_captured_sigma_is_each_layers_starting_rms():
    scales = [0.05 * (i + 1) for i in range(14)]  # 2 layers x 7 projections
    _, targets = _pretrained_like(scales)
    reference = SignReference.capture(targets)
    assert reference.sigma_source == "start_rms"
    for t, std in zip(targets, scales):
        w = t.param.detach().double()
        assert reference.sigma(t) == pytest.approx(w.pow(2).mean().sqrt().item(), rel=1e-12)
        assert reference.sigma(t) == pytest.approx(std, rel=5 / (2 * w.numel()) ** 0.5)  # the std it was drawn with
        assert t.init_std == pytest.approx(0.02)  # what seeded runs use, and captured ones no longer do
    margin = 0.25
    value = outward_drift(reference, margin)
    grads = torch.autograd.grad(value, [t.param for t in targets])
    n = sum(t.param.numel() for t in targets)
    inside_total = 0
    for g, t in zip(grads, targets):
        # Captured signs are the starting signs, so s0 * w = |w|: the hinge acts where |w| < d * rms_l.
        inside = t.param.detach().abs() < margin * reference.sigma(t)
        inside_total += int(inside.sum())
        assert torch.equal(g != 0, inside)
        assert 0.1 < inside.float().mean() < 0.3  # ~20% of a normal layer lies within 0.25 std of zero
    assert margin_share(reference, margin) == inside_total / n
    expected = sum(torch.relu(margin * reference.sigma(t) - t.param.detach().abs()).sum().item() for t in targets) / n
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # The near-zero band is in the same unit.
    observed = FlipTracker(reference, near_zero_band=0.25).observe(0)
    assert observed["near_zero_fraction"] == inside_total / n and observed["flip_rate"] == 0.0


def test_seeded_and_explicit_sigma_stay_the_init_std():
    _, targets = _pretrained_like([0.3] * 14)
    explicit = SignReference.capture(targets, scale_from_weights=False)  # what an explicit `init_std` asks for
    for reference in (SignReference.from_seed(targets, seed=8), explicit):
        assert reference.sigma_source == "init_std"
        assert all(reference.sigma(t) == t.init_std == pytest.approx(0.02) for t in targets)
    with torch.no_grad():  # an all-zero layer has no scale of its own: it keeps its init std
        targets[0].param.zero_()
    reference = SignReference.capture(targets)
    assert reference.sigma(targets[0]) == targets[0].init_std and reference.sigma(targets[1]) > 0.2
