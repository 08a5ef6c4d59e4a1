"""LoRA on compressed SignLock layers: PEFT adapters on a model loaded with ``dequantize=False``, trained with the
real ``transformers.Trainer``; only the adapters change, they reload to the same logits, ``merge_and_unload`` gives a
dense model; the compressed layer decodes once per forward; a missing peft says how to install it."""

import importlib
import sys

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_contract import CONFIGS
from test_quantizer import IDS, SEED, trained_model
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.pytorch_utils import Conv1D

import hf_signlock
from hf_signlock import MissingDependencyError, SignLockConfig, SignLockConfigError, SignLockError, quantize_model
from hf_signlock.quantization.linear import SignLockLinear
from hf_signlock.quantization.lora import SignLockLoraLinear, get_lora_config, register_lora_modules

ARCH_CONFIGS = CONFIGS  # Llama, Qwen2, Mistral and GPT-2, as the quantizer contract tests them
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "mistral": LLAMA_LIKE, "gpt2": ["c_attn", "c_proj", "c_fc"]}
# the exact codec makes base logits bit-identical to the dense model's; scale is lossy (and Qwen2's q/k/v have biases)
CODECS = {"llama": "exact", "gpt2": "exact", "qwen2": "scale", "mistral": "scale"}
# merged (x (W + s B A)^T) vs unmerged (x W^T + s (x A^T) B^T) float32 logits: a few ulps of rounding apart
MERGE_ATOL = 1e-5
PERIOD, BLOCK, STEPS = 8, 16, 30


def compressed_checkpoint(folder, arch: str):
    model = trained_model(arch, ARCH_CONFIGS[arch]())
    quantize_model(model, SignLockConfig(seed=SEED, codec=CODECS[arch], dequantize=False))
    model.save_pretrained(folder)
    return folder


def load_compressed(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=SignLockConfig(dequantize=False), **kwargs)


def periodic_dataset(rows: int = 64) -> list[dict]:
    """Sequences counting up modulo PERIOD from a random start: the next token is always learnable."""
    starts = torch.randint(0, PERIOD, (rows, 1), generator=torch.Generator().manual_seed(1))
    ids = (starts + torch.arange(BLOCK)) % PERIOD
    return [{"input_ids": row, "labels": row} for row in ids]


def mean_loss(model, data) -> float:
    ids = torch.stack([row["input_ids"] for row in data])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every compressed layer's payload and bias, copied."""
    state = {}
    for layer in (m for m in model.modules() if isinstance(m, SignLockLinear)):
        state[f"{layer.param_name}:payload"] = layer.payload.clone()
        if layer.bias is not None:
            state[f"{layer.param_name}:bias"] = layer.bias.detach().clone()
    return state


def layers_of(model) -> list[SignLockLinear]:
    return [m for m in model.modules() if isinstance(m, SignLockLinear)]


@pytest.fixture(scope="module", params=sorted(ARCH_CONFIGS))
def trained(request, tmp_path_factory):
    """A compressed checkpoint, LoRA adapters trained on it by the Trainer and saved, and what was seen on the way."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    folder = compressed_checkpoint(root / "compressed", arch)
    model = get_peft_model(load_compressed(folder), get_lora_config(r=4, lora_alpha=8, target_modules=TARGETS[arch]))
    data = periodic_dataset()
    frozen_before = frozen_state(model)
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_before = mean_loss(model, data)
    args = TrainingArguments(output_dir=str(root / "run"), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                             logging_steps=STEPS, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    model.eval()
    model.save_pretrained(root / "adapter")
    return {"arch": arch, "folder": folder, "adapter": root / "adapter", "model": model, "data": data,
            "frozen_before": frozen_before, "adapters_before": adapters_before, "loss_before": loss_before,
            "loss_after": mean_loss(model, data), "logits": model(IDS).logits.detach()}


def test_trainer_changes_only_the_adapters(trained):
    model = trained["model"]
    layers = layers_of(model)
    assert layers and all(isinstance(m, SignLockLoraLinear) for m in model.modules()
                          if any(isinstance(c, SignLockLinear) for c in m.children()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(trained["adapters_before"]) and all(".lora_" in n for n in trainable)
    after = frozen_state(model)
    assert after.keys() == trained["frozen_before"].keys()
    for key, before in trained["frozen_before"].items():
        assert torch.equal(after[key], before), key  # payload bytes and biases untouched
    if trained["arch"] == "qwen2":
        assert any(key.endswith(":bias") for key in after)  # the frozen biases were really checked
    params = dict(model.named_parameters())
    changed = [n for n, before in trained["adapters_before"].items() if not torch.equal(params[n], before)]
    assert sorted(changed) == sorted(trained["adapters_before"])  # every A and B moved


def test_trainer_lowers_the_loss(trained):
    # From ln(64) ~ 4.16 to ~3.6 in 30 steps; the frozen random lm_head (std 0.02) caps how peaked logits can get.
    assert trained["loss_after"] < trained["loss_before"] - 0.3, (trained["loss_before"], trained["loss_after"])


def test_saved_adapter_loads_onto_a_fresh_compressed_model_with_the_same_logits(trained):
    config = register_lora_modules(LoraConfig.from_pretrained(trained["adapter"]))
    reloaded = PeftModel.from_pretrained(load_compressed(trained["folder"]), trained["adapter"], config=config)
    assert len(layers_of(reloaded)) == len(layers_of(trained["model"]))
    assert torch.equal(reloaded(IDS).logits, trained["logits"])
    native = load_compressed(trained["folder"])  # transformers' own integration takes the registered config too
    native.load_adapter(trained["adapter"], peft_config=config)
    assert torch.equal(native(IDS).logits, trained["logits"])


def test_merge_and_unload_gives_a_dense_model_with_the_adapter_logits(trained, tmp_path):
    config = register_lora_modules(LoraConfig.from_pretrained(trained["adapter"]))
    merged = PeftModel.from_pretrained(load_compressed(trained["folder"]), trained["adapter"],
                                       config=config).merge_and_unload()
    assert not layers_of(merged) and not any("lora" in name for name, _ in merged.named_modules())
    dense_type = Conv1D if trained["arch"] == "gpt2" else torch.nn.Linear
    names = [name for name, m in merged.named_modules() if type(m) is dense_type and name.split(".")[-1] in
             TARGETS[trained["arch"]]]
    assert len(names) == len(layers_of(trained["model"]))
    logits = merged(IDS).logits
    torch.testing.assert_close(logits, trained["logits"], atol=MERGE_ATOL, rtol=0)
    merged.dequantize()  # drops the SignLock quantization config: a plain dense model from here on
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(loaded.config, "quantization_config", None) is None
    assert torch.equal(loaded(IDS).logits, logits)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return compressed_checkpoint(tmp_path_factory.mktemp("lora-llama") / "compressed", "llama")


def test_unload_gives_back_the_compressed_layers(llama_folder):
    model = get_peft_model(load_compressed(llama_folder), get_lora_config(r=2, target_modules=LLAMA_LIKE))
    base = model.unload()
    assert len(layers_of(base)) == 14 and not any(isinstance(m, SignLockLoraLinear) for m in base.modules())


def test_merge_in_place_and_variants_are_refused(llama_folder):
    model = get_peft_model(load_compressed(llama_folder), get_lora_config(r=2, target_modules=["q_proj"]))
    with pytest.raises(SignLockError, match="merge_and_unload"):
        model.merge_adapter()
    with pytest.raises(SignLockConfigError, match="use_dora"):
        get_peft_model(load_compressed(llama_folder), get_lora_config(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(SignLockConfigError, match="init_lora_weights='pissa'"):
        get_peft_model(load_compressed(llama_folder),
                       get_lora_config(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))


@pytest.fixture
def decodes(monkeypatch):
    """``param_name -> how many times decode_weight ran`` from now on."""
    counts = {}
    decode = SignLockLinear.decode_weight

    def counting(self, *args, **kwargs):
        counts[self.param_name] = counts.get(self.param_name, 0) + 1
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(SignLockLinear, "decode_weight", counting)
    return counts


def test_forward_decodes_once_and_a_training_step_at_most_twice(llama_folder, decodes):
    model = load_compressed(llama_folder)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    assert decodes == {layer.param_name: 1}
    out.sum().backward()  # the input's gradient needs the weight once more
    assert decodes == {layer.param_name: 2}

    peft_model = get_peft_model(model, get_lora_config(r=2, target_modules=LLAMA_LIKE))
    decodes.clear()
    peft_model(IDS)
    assert sorted(decodes.values()) == [1] * 14  # every layer, once
    decodes.clear()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    assert len(decodes) == 14 and max(decodes.values()) <= 2


def test_weight_decodes_once_while_held_and_device_lookup_does_not_decode(llama_folder, decodes):
    model = load_compressed(llama_folder)
    layer = model.model.layers[1].self_attn.o_proj
    weight = layer.weight
    assert all(layer.weight is weight for _ in range(3))
    assert decodes == {layer.param_name: 1}
    del weight  # nothing weight-sized stays behind: the next access decodes again
    layer.weight  # noqa: B018
    assert decodes == {layer.param_name: 2}
    peft_model = get_peft_model(model, get_lora_config(r=2, target_modules=["o_proj"]))
    wrapped = peft_model.base_model.model.model.layers[1].self_attn.o_proj
    decodes.clear()
    assert wrapped._get_base_layer_device_and_dtype(layer) == (layer.payload.device, layer.dtype)
    assert decodes == {}


def test_bfloat16_compressed_model_trains_fp32_adapters(llama_folder):
    model = get_peft_model(load_compressed(llama_folder, dtype=torch.bfloat16),
                           get_lora_config(r=2, target_modules=LLAMA_LIKE))
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert wrapped.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    assert wrapped(torch.randn(1, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss) and wrapped.lora_B["default"].weight.grad is not None


def test_missing_peft_raises_a_typed_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails, as when it is not installed
    # a fresh import of the module, undone afterwards (sys.modules, the package attribute, the lazy name's cache)
    monkeypatch.delitem(sys.modules, "hf_signlock.quantization.lora")
    monkeypatch.setattr(hf_signlock.quantization, "lora", None)
    monkeypatch.setitem(vars(hf_signlock), "get_lora_config", None)
    monkeypatch.delitem(vars(hf_signlock), "get_lora_config")
    lora = importlib.import_module("hf_signlock.quantization.lora")  # importing still works (walkers, `import *`)
    for call in (lambda: hf_signlock.get_lora_config(r=2), lambda: lora.register_lora_modules(object())):
        with pytest.raises(MissingDependencyError, match=r'pip install "hf-signlock\[peft\]"') as error:
            call()
        assert isinstance(error.value, ImportError) and isinstance(error.value, SignLockError)


def test_too_old_peft_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.18.1")  # its custom layers get no LoraConfig: a TypeError deep inside
    with pytest.raises(MissingDependencyError, match=r"peft>=0\.19, found 0\.18\.1: pip install -U"):
        get_lora_config(r=2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # an untied head, and a head tied to the embedding
def test_lora_on_a_model_whose_embeddings_are_compressed(tmp_path, arch):
    """The token embedding and head compressed too (here not seeded: packed signs): they stay frozen while adapters
    on the projections train, and the adapter reloads and merges as on any compressed model."""
    from hf_signlock.quantization.compressed import CompressedWeight
    from hf_signlock.quantization.embedding import SignLockEmbedding

    model = trained_model(arch, ARCH_CONFIGS[arch]())
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact", dequantize=False, target_embeddings=True))
    model.save_pretrained(tmp_path / "compressed")
    peft_model = get_peft_model(load_compressed(tmp_path / "compressed"),
                                get_lora_config(r=4, lora_alpha=8, target_modules=TARGETS[arch]))
    assert isinstance(peft_model.get_input_embeddings(), SignLockEmbedding)
    frozen = {m.param_name: m.payload.clone() for m in peft_model.modules() if isinstance(m, CompressedWeight)}
    data = periodic_dataset()
    before = mean_loss(peft_model, data)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    Trainer(model=peft_model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    peft_model.eval()
    assert mean_loss(peft_model, data) < before - 0.3
    assert all(".lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    after = {m.param_name: m.payload for m in peft_model.modules() if isinstance(m, CompressedWeight)}
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)
    peft_model.save_pretrained(tmp_path / "adapter")
    logits = peft_model(IDS).logits.detach()
    config = register_lora_modules(LoraConfig.from_pretrained(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_compressed(tmp_path / "compressed"), tmp_path / "adapter", config=config)
    assert torch.equal(reloaded(IDS).logits, logits)
    merged = reloaded.merge_and_unload().dequantize()  # the embedding and head decode too, a tied head tied again
    assert not any(isinstance(m, CompressedWeight) for m in merged.modules())
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) is (arch == "gpt2")
    torch.testing.assert_close(merged(IDS).logits, logits, atol=MERGE_ATOL, rtol=0)
