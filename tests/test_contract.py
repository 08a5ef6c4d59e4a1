"""The transformers quantizer contract on Llama, Qwen2 (q/k/v biases), Mistral and GPT-2 (Conv1D with biases):
loading in fp32, bf16 and fp16, dense or compressed; ``model.dequantize()``; quantize-on-load from a dense folder;
``validate_environment`` refusals; ``generate()`` and ``pipeline``; load -> save -> load keeps the logits and the
stored bytes; decoding on a CUDA device when there is one."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_quantizer import IDS, SEED, compressed, trained_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, pipeline

from hf_signlock import (
    BudgetError,
    CorruptCheckpointError,
    SignLockConfig,
    SignLockConfigError,
    SignLockError,
    quantize_model,
)
from hf_signlock.quantization.linear import SignLockLinear
from hf_signlock.targets import find_target_modules

CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64),
    "qwen2": lambda: Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64),
    "mistral": lambda: MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64, sliding_window=None),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                               eos_token_id=0),
}
ARCHS = sorted(CONFIGS)
# Largest |logit| difference from the fp32 model, per load dtype: the rounding of weights and activations only.
TOLERANCE = {torch.float32: 0.0, torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.fixture(scope="module", params=ARCHS)
def export(request, tmp_path_factory):
    """(arch, dense fp32 logits, dense folder, SignLock folder): an exact-codec export with coded flips."""
    arch = request.param
    model = trained_model(arch, CONFIGS[arch]())
    logits = model(IDS).logits.detach()
    folder = tmp_path_factory.mktemp(f"{arch}-export")
    dense_folder = tmp_path_factory.mktemp(f"{arch}-dense")
    model.save_pretrained(dense_folder)
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact"))
    model.save_pretrained(folder)
    return arch, logits, dense_folder, folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dequantize", [True, False], ids=["dense", "compressed"])
def test_loads_in_every_dtype(export, dtype, dequantize):
    _, dense_logits, _, folder = export
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                 quantization_config=SignLockConfig(dequantize=dequantize))
    layers = compressed(model)
    assert bool(layers) is not dequantize
    assert model.is_quantized is not dequantize and hasattr(model.config, "quantization_config") is not dequantize
    for layer in layers:
        assert layer.dtype == dtype and (layer.bias is None or layer.bias.dtype == dtype)
    logits = model(IDS).logits
    assert logits.dtype == dtype
    assert (logits.float() - dense_logits).abs().max() <= TOLERANCE[dtype]


def test_dequantize_gives_the_dense_model(export):
    _, dense_logits, _, folder = export
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SignLockConfig(dequantize=False))
    dense = model.dequantize()
    assert not compressed(dense) and not hasattr(dense.config, "quantization_config") and not dense.is_quantized
    assert torch.equal(dense(IDS).logits, dense_logits)


def test_quantize_on_load_from_a_dense_folder(export, tmp_path):
    _, dense_logits, dense_folder, _ = export
    model = AutoModelForCausalLM.from_pretrained(dense_folder, quantization_config=SignLockConfig(seed=SEED,
                                                                                                  codec="exact"))
    targets = find_target_modules(AutoModelForCausalLM.from_pretrained(dense_folder))
    assert len(compressed(model)) == len(targets) and model.is_quantized  # quantize-on-load keeps them compressed
    assert torch.equal(model(IDS).logits, dense_logits)
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, dense_logits)
    dense = AutoModelForCausalLM.from_pretrained(dense_folder, quantization_config=SignLockConfig(
        seed=SEED, codec="scale", dequantize=True))
    assert not compressed(dense) and not hasattr(dense.config, "quantization_config")
    signs = {n: torch.sign(p) for n, p in AutoModelForCausalLM.from_pretrained(dense_folder).named_parameters()}
    for name, module in dense.named_modules():  # the scale codec is lossy; the signs are exact
        if name.endswith(("proj", "c_attn", "c_fc")) and hasattr(module, "weight"):
            assert torch.equal(torch.sign(module.weight), signs[f"{name}.weight"]), name


def test_save_after_load_keeps_logits_and_bytes(export, tmp_path):
    _, dense_logits, _, folder = export
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SignLockConfig(dequantize=False))
    model.save_pretrained(tmp_path)
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    stored = [json.loads((f / "config.json").read_text())["quantization_config"] for f in (folder, tmp_path)]
    stored[1].pop("dequantize"), stored[0].pop("dequantize")  # the loading attribute the second load chose
    assert stored[0] == stored[1]
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, dense_logits)


def test_generate_and_pipeline_on_an_export(tmp_path):
    from hf_signlock.data import train_tokenizer

    tokenizer = train_tokenizer(["to be or not to be, that is the question"] * 20, 300)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = quantize_model(trained_model("llama", config), SignLockConfig(seed=SEED, codec="exact"))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for dequantize in (True, False):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=SignLockConfig(
            dequantize=dequantize))
        ids = tokenizer("to be or", return_tensors="pt").input_ids
        out = loaded.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 6)
        assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))
    text = pipeline("text-generation", model=str(tmp_path), max_new_tokens=4, do_sample=False)("to be or")
    assert text[0]["generated_text"].startswith("to be or")


@pytest.mark.parametrize("device_map", [{"": "disk"}, {"model": "cpu", "lm_head": "disk"}])
def test_offload_is_refused_with_the_fix(export, device_map):
    with pytest.raises(SignLockConfigError, match="offloads part of the model.*Load on one device"):
        AutoModelForCausalLM.from_pretrained(export[3], device_map=device_map)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the CUDA backend")
def test_a_cuda_device_map_without_cuda_is_refused(export):
    with pytest.raises(SignLockConfigError, match="no CUDA backend.*device_map='cpu'"):
        AutoModelForCausalLM.from_pretrained(export[3], device_map="cuda")


def test_an_impossible_budget_is_refused_before_loading(export):
    dense_folder = export[2]
    with pytest.raises(BudgetError, match="cannot hold packed signs.*Raise bits_per_weight"):
        AutoModelForCausalLM.from_pretrained(dense_folder, quantization_config=SignLockConfig(
            sign_source="packed", bits_per_weight=0.5))
    with pytest.raises(SignLockConfigError, match="Raise the bits per weight"):
        AutoModelForCausalLM.from_pretrained(dense_folder, quantization_config=SignLockConfig(
            seed=SEED, codec="vq", bits_per_weight=0.05))


def test_a_model_with_dequantized_layers_refuses_to_save_as_signlock(export, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(export[3], quantization_config=SignLockConfig(dequantize=False))
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, SignLockLinear))
    model.set_submodule(name, layer.dense())
    remaining = len(compressed(model))
    with pytest.raises(SignLockError, match=f"{remaining} remain compressed.*model.dequantize"):
        model.save_pretrained(tmp_path)


def test_records_of_other_targets_are_refused(export, tmp_path):
    arch, _, _, folder = export
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["target_modules"] = ["mlp.down_proj" if arch != "gpt2" else "mlp.c_proj"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="describe other target layers"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("codec", ["exact", "vq"])
def test_decoding_on_cuda_equals_the_cpu(tmp_path, codec):
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    model = quantize_model(trained_model("llama", config, moved=0.3), SignLockConfig(seed=SEED, codec=codec))
    model.save_pretrained(tmp_path)
    on_cpu = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=SignLockConfig(dequantize=False))
    on_gpu = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda",
                                                  quantization_config=SignLockConfig(dequantize=False))
    for cpu_layer, gpu_layer in zip(compressed(on_cpu), compressed(on_gpu)):
        assert gpu_layer.payload.device.type == "cuda"
        weight = gpu_layer.decode_weight()
        assert weight.device.type == "cuda"  # decoded where the payload lives
        assert torch.equal(weight.cpu(), cpu_layer.decode_weight())
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda")
    assert torch.allclose(dense(IDS.cuda()).logits.cpu(), on_cpu(IDS).logits, atol=1e-4)
    # Kept compressed on the GPU (no CPU kernel there: the decode-then-matmul path) the logits and greedy tokens
    # are the CPU kernels' to float rounding.
    with torch.no_grad():
        assert torch.allclose(on_gpu(IDS.cuda()).logits.cpu(), on_cpu(IDS).logits, atol=1e-4)
        tokens = {"max_new_tokens": 8, "do_sample": False}
        assert torch.equal(on_gpu.generate(IDS.cuda(), **tokens).cpu(), on_cpu.generate(IDS, **tokens))
