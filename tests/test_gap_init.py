"""Gap-based init on Llama, Qwen2, Mistral and GPT-2: signs, std, gap, untouched non-targets, errors."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from hf_signlock import (
    SignLockConfigError,
    TargetNotFoundError,
    apply_gap_init,
    gap_floor,
    gap_scale,
    resolve_targets,
    seeded_signs,
    template_signs,
)
from hf_signlock.training.init_distribution import InitDistribution

SMALL = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "bos_token_id": 0, "eos_token_id": 1}
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=1),
}
EXPECTED_TARGETS = {"llama": 14, "qwen2": 14, "mistral": 14, "gpt2": 12}


def build(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]())


@pytest.mark.parametrize("arch", CONFIGS)
def test_init_std_is_what_the_model_gives(arch):
    model = build(arch)
    targets = resolve_targets(model)
    assert len(targets) == EXPECTED_TARGETS[arch]
    for target in targets:
        n = target.param.numel()
        # Sample std of n normal draws has relative standard error 1/sqrt(2n); allow 5 of them.
        assert target.param.std().item() == pytest.approx(target.init_std, rel=5 / math.sqrt(2 * n))
    if arch == "gpt2":
        scaled = [t for t in targets if t.name.endswith("c_proj.weight")]
        assert len(scaled) == 6
        assert all(t.init_std == pytest.approx(0.02 / math.sqrt(2 * 3)) for t in scaled)


@pytest.mark.parametrize("gap", [0.0, 1.0])
@pytest.mark.parametrize("arch", CONFIGS)
def test_gap_init_statistics(arch, gap):
    model = build(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = apply_gap_init(model, seed=17, gap=gap)
    target_names = {t.name for t in targets}
    for target in targets:
        w = target.param.detach()
        s0 = seeded_signs(17, target.name, w.numel()).view(w.shape)
        assert torch.equal(torch.sign(w).to(torch.int8), s0)  # every sign is the generator's
        assert w.std().item() == pytest.approx(target.init_std, rel=5 / math.sqrt(2 * w.numel()))
        assert w.abs().min().item() >= gap_floor(target.init, gap) * (1 - 1e-6)
    for name, p in model.named_parameters():  # embeddings, LM head, norms, biases untouched
        if name not in target_names:
            assert torch.equal(p.detach(), before[name]), name


def test_gpt2_conv1d_positions_are_row_major_over_the_stored_in_out_layout():
    model = build("gpt2")
    apply_gap_init(model, seed=3, gap=0.5)
    conv = model.transformer.h[0].mlp.c_fc
    assert tuple(conv.weight.shape) == (64, 256)  # Conv1D stores [in, out], unlike nn.Linear's [out, in]
    name = "transformer.h.0.mlp.c_fc.weight"
    flat = seeded_signs(3, name, 64 * 256)
    # Position 256 * i + j is weight[i, j]: input feature i, output feature j.
    for i, j in [(0, 0), (0, 255), (1, 0), (63, 17)]:
        assert torch.sign(conv.weight[i, j]).item() == flat[256 * i + j].item()


def test_magnitudes_follow_the_truncated_half_normal():
    model = build("llama")
    gap = 1.0
    targets = apply_gap_init(model, seed=5, gap=gap)
    units = torch.cat([t.param.detach().abs().flatten() / (gap_scale(t.init, gap) * t.init_std) for t in targets])
    units = units.double().sort().values
    n = units.numel()
    # Quantiles of |Z| given |Z| >= 1: Q(q) = Phi^-1(1 - (1 - q) * P(|Z| >= 1) / 2).
    tail = math.erfc(gap / math.sqrt(2))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        expected = -torch.special.ndtri(torch.tensor((1 - q) * tail / 2, dtype=torch.float64)).item()
        observed = units[int(q * (n - 1))].item()
        assert observed == pytest.approx(expected, rel=0.01), q
    assert units[0].item() >= gap * (1 - 1e-6)


def test_gap_scale_keeps_unit_variance():
    for kind in ("normal", "uniform"):
        for gap in (0.0, 0.5, 1.0, 1.5):
            init = InitDistribution(kind, 1.0)
            c = gap_scale(init, gap)
            if kind == "normal":
                z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).abs()
                z = z[z >= gap]
            else:
                z = torch.rand(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (3**0.5 - gap) + gap
            assert (c * z).pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=5e-3), (kind, gap)


def test_template_sign_source():
    model = build("qwen2")
    for target in apply_gap_init(model, seed=2, gap=1.0, sign_source="template", template_rank=4):
        expected = template_signs(2, target.name, tuple(target.param.shape), 4)
        assert torch.equal(torch.sign(target.param.detach()).to(torch.int8), expected)


def test_same_seed_same_weights():
    first, second = build("llama"), build("mistral")
    a = apply_gap_init(first, seed=1, gap=1.0)
    b = apply_gap_init(second, seed=1, gap=1.0)
    assert all(torch.equal(x.param, y.param) for x, y in zip(a, b))  # same names, same shapes: same init


def test_target_patterns():
    model = build("llama")
    assert [t.name for t in resolve_targets(model, ["q_proj"])] == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert len(resolve_targets(model, r"model\.layers\.1\..*_proj")) == 7
    with pytest.raises(TargetNotFoundError, match="q_proj"):
        resolve_targets(model, ["q_proj", "qkv"])
    with pytest.raises(TargetNotFoundError, match="down_proj"):
        resolve_targets(model, r"nothing\.here")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"gap": -0.1}, "gap"), ({"gap": float("nan")}, "gap"), ({"seed": 2.5}, "seed"), ({"sign_source": "x"}, "sign_source"),
])
def test_bad_input(kwargs, field):
    model = build("llama")
    with pytest.raises(SignLockConfigError, match=field):
        apply_gap_init(model, **{"seed": 0, "gap": 1.0, **kwargs})
