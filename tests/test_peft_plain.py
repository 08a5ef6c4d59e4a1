"""Plain PEFT on compressed SignLock layers, as on a bitsandbytes or GPTQ model: a plain ``LoraConfig`` with
``get_peft_model``, the real ``transformers.Trainer``, ``save_pretrained``, ``PeftModel.from_pretrained`` /
``load_adapter`` with no config of ours, ``merge_and_unload`` and "all-linear"; the hook on PEFT's dispatch is set
whether PEFT is imported before or after the model loads, and leaves dense layers to PEFT."""

import importlib
import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from test_contract import CONFIGS
from test_lora import MERGE_ATOL, TARGETS, compressed_checkpoint, frozen_state, layers_of, load_compressed
from test_quantizer import IDS, SEED, trained_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator
from transformers.pytorch_utils import Conv1D

from hf_signlock import SignLockConfig, SignLockConfigError, SignLockError, quantize_model
from hf_signlock.quantization import linear as signlock_linear
from hf_signlock.quantization.embedding import SignLockEmbedding, SignLockTiedHead
from hf_signlock.quantization.linear import SignLockLinear
from hf_signlock.quantization.lora import SignLockLoraLinear

STEPS = 5  # enough for Adam to move every A and B; test_lora checks that the loss really falls
LAYERS = {"llama": 14, "gpt2": 8}  # targeted projections of the two-layer test models


def periodic_rows(rows: int = 16, block: int = 16) -> list[dict]:
    ids = (torch.randint(0, 8, (rows, 1), generator=torch.Generator().manual_seed(1)) + torch.arange(block)) % 8
    return [{"input_ids": row, "labels": row} for row in ids]


def lora_parents(model) -> list[torch.nn.Module]:
    """The modules whose direct child is a ``SignLockLinear`` (its LoRA wrapper, once PEFT has wrapped it)."""
    return [m for m in model.modules() if any(isinstance(c, SignLockLinear) for c in m.children())]


@pytest.fixture(scope="module", params=["gpt2", "llama"])  # Conv1D layout (fused c_attn) and nn.Linear layout
def plain(request, tmp_path_factory):
    """A compressed checkpoint, a plain LoraConfig's adapters trained on it by the Trainer and saved."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"plain-{arch}")
    folder = compressed_checkpoint(root / "compressed", arch)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch])
    model = get_peft_model(load_compressed(folder), config)
    frozen_before = frozen_state(model)
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(root / "run"), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    Trainer(model=model, args=args, train_dataset=periodic_rows(), data_collator=default_data_collator).train()
    model.eval()
    model.save_pretrained(root / "adapter")
    return {"arch": arch, "folder": folder, "adapter": root / "adapter", "model": model, "config": config,
            "frozen_before": frozen_before, "adapters_before": adapters_before,
            "logits": model(IDS).logits.detach()}


def test_a_plain_lora_config_wraps_every_targeted_compressed_layer(plain):
    model = plain["model"]
    parents = lora_parents(model)
    assert len(parents) == LAYERS[plain["arch"]] and all(type(m) is SignLockLoraLinear for m in parents)
    assert plain["config"]._custom_modules is None  # plain: nothing registered on the user's config


def test_trainer_trains_the_adapters_and_leaves_the_payload_alone(plain):
    model = plain["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(plain["adapters_before"]) and trainable and all(".lora_" in n for n in trainable)
    after = frozen_state(model)
    assert after.keys() == plain["frozen_before"].keys() and after
    for key, before in plain["frozen_before"].items():
        assert torch.equal(after[key], before), key  # payload bytes (and biases) unchanged
    params = dict(model.named_parameters())
    changed = [n for n, before in plain["adapters_before"].items() if not torch.equal(params[n], before)]
    assert sorted(changed) == sorted(plain["adapters_before"])  # every A and B got gradients and moved


def test_the_adapter_loads_back_with_no_config_of_ours(plain):
    reloaded = PeftModel.from_pretrained(load_compressed(plain["folder"]), plain["adapter"])
    assert len(lora_parents(reloaded)) == LAYERS[plain["arch"]]
    assert torch.equal(reloaded(IDS).logits, plain["logits"])
    native = load_compressed(plain["folder"])  # transformers' own integration, no peft_config either
    native.load_adapter(plain["adapter"])
    assert torch.equal(native(IDS).logits, plain["logits"])
    # the same adapter on the dense model (the exact codec decodes to the trained weights): A and B fit it as is
    dense = AutoModelForCausalLM.from_pretrained(plain["folder"], quantization_config=SignLockConfig(dequantize=True))
    assert not layers_of(dense)
    torch.testing.assert_close(PeftModel.from_pretrained(dense, plain["adapter"])(IDS).logits, plain["logits"],
                               atol=MERGE_ATOL, rtol=0)
    trainable = PeftModel.from_pretrained(load_compressed(plain["folder"]), plain["adapter"], is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)


def test_merge_and_unload_gives_dense_layers_with_the_adapter_logits(plain, tmp_path):
    merged = PeftModel.from_pretrained(load_compressed(plain["folder"]), plain["adapter"]).merge_and_unload()
    assert not layers_of(merged) and not any("lora" in name for name, _ in merged.named_modules())
    dense_type = Conv1D if plain["arch"] == "gpt2" else torch.nn.Linear
    merged_layers = [m for name, m in merged.named_modules() if name.split(".")[-1] in TARGETS[plain["arch"]]]
    assert len(merged_layers) == LAYERS[plain["arch"]] and all(type(m) is dense_type for m in merged_layers)
    logits = merged(IDS).logits
    base_logits = load_compressed(plain["folder"])(IDS).logits
    assert (base_logits - plain["logits"]).abs().max() > 100 * MERGE_ATOL  # the adapter matters: a real check
    torch.testing.assert_close(logits, plain["logits"], atol=MERGE_ATOL, rtol=0)
    merged.dequantize().save_pretrained(tmp_path)  # a plain dense model from here on
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, logits)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return compressed_checkpoint(tmp_path_factory.mktemp("plain-llama") / "compressed", "llama")


def test_merging_in_place_and_weight_rewriting_options_are_refused_by_type(llama_folder):
    model = get_peft_model(load_compressed(llama_folder), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(SignLockError, match="merge_and_unload"):
        model.merge_adapter()
    with pytest.raises(SignLockConfigError, match="use_dora"):
        get_peft_model(load_compressed(llama_folder), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(SignLockConfigError, match="pissa"):
        get_peft_model(load_compressed(llama_folder),
                       LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_all_linear_and_peft_defaults_reach_the_compressed_layers(llama_folder):
    model = get_peft_model(load_compressed(llama_folder), LoraConfig(r=2, target_modules="all-linear"))
    assert len(lora_parents(model)) == LAYERS["llama"] and all(type(m) is SignLockLoraLinear
                                                                for m in lora_parents(model))
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the (dense) head is left out, as PEFT does
    defaults = get_peft_model(load_compressed(llama_folder), LoraConfig(r=2))  # PEFT's per-model q_proj, v_proj
    assert sorted(name.split(".")[-1] for name, m in defaults.named_modules()
                  if isinstance(m, SignLockLoraLinear)) == ["q_proj", "q_proj", "v_proj", "v_proj"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # an untied compressed head, and a head tied to the embedding
def test_compressed_embeddings_take_no_adapter_and_all_linear_skips_the_head(tmp_path, arch):
    model = trained_model(arch, CONFIGS[arch]())
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact", dequantize=False, target_embeddings=True))
    model.save_pretrained(tmp_path)
    peft_model = get_peft_model(load_compressed(tmp_path), LoraConfig(r=2, target_modules="all-linear"))
    head = peft_model.get_output_embeddings()
    assert isinstance(head, SignLockLinear if arch == "llama" else SignLockTiedHead)  # not wrapped
    assert isinstance(peft_model.get_input_embeddings(), SignLockEmbedding)
    assert len([m for m in peft_model.modules() if isinstance(m, SignLockLoraLinear)]) == LAYERS[arch]
    embedding, tied_head = ("model.embed_tokens", None) if arch == "llama" else ("transformer.wte", "lm_head")
    with pytest.raises(SignLockConfigError, match=rf"{embedding} is a compressed token embedding"):
        get_peft_model(load_compressed(tmp_path), LoraConfig(r=2, target_modules=[embedding.split(".")[-1]]))
    if tied_head:
        with pytest.raises(SignLockConfigError, match="lm_head is a compressed LM head tied to it"):
            get_peft_model(load_compressed(tmp_path), LoraConfig(r=2, target_modules=["lm_head"]))


def test_dense_layers_keep_peft_own_lora_layers():
    model = get_peft_model(trained_model("llama", CONFIGS["llama"]()), LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(wrapped) == 2 and all(type(m) is PeftLoraLinear for m in wrapped)


def test_the_hook_waits_for_peft_when_the_model_loads_first(monkeypatch):
    """PEFT's LoRA module imported after ours: the import hook sets the dispatch once that module has executed, and
    an availability check (find_spec) alone does not use it up."""
    import peft.tuners.lora as lora_package

    name = signlock_linear.PEFT_LORA_MODULE
    original = sys.modules[name]
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, name)  # restored afterwards, with the package's attribute
    monkeypatch.setattr(lora_package, "model", original)
    signlock_linear.hook_peft_lora()
    waiting = [f for f in sys.meta_path if isinstance(f, signlock_linear._HookAfterPeftImport)]
    assert len(waiting) == 1
    assert importlib.util.find_spec(name) is not None
    assert waiting[0] in sys.meta_path
    fresh = importlib.import_module(name)  # a second execution of PEFT's module: a new LoraModel class
    assert fresh is not original and fresh.LoraModel is not original.LoraModel
    assert fresh.LoraModel._create_new_module._signlock_hook
    assert not any(isinstance(f, signlock_linear._HookAfterPeftImport) for f in sys.meta_path)  # one shot
    hooked = fresh.LoraModel._create_new_module
    signlock_linear.hook_peft_lora()  # idempotent: not wrapped twice
    assert fresh.LoraModel._create_new_module is hooked


@pytest.mark.slow
def test_a_user_script_importing_peft_after_loading(llama_folder):
    """The order most scripts meet: hf_signlock, a compressed model, then PEFT (which loading does not import)."""
    script = textwrap.dedent(f"""
        import sys
        import hf_signlock
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(llama_folder)!r},
                                                     quantization_config=hf_signlock.SignLockConfig(dequantize=False))
        assert "peft" not in sys.modules, "loading a compressed model imported peft"
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        print(sorted({{type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['SignLockLoraLinear']"
