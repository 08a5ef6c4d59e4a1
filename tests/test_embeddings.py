"""The token embedding and the LM head as targets: which modules they are (tied or not), their seeded gap init,
their compressed modules (row lookups equal to the whole decode, a tied head sharing the embedding's payload),
save -> load in every form with the tie kept, the guard, the bits report and the whole-file budget."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_edits import edit_quantization_config
from test_quantizer import CONFIGS as QUANTIZER_CONFIGS
from test_quantizer import IDS, SEED
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaConfig

from hf_signlock import (
    BudgetError,
    CorruptCheckpointError,
    SignLockConfig,
    SignLockConfigError,
    apply_gap_init,
    checkpoint_report,
    quantize_model,
    seeded_signs,
)
from hf_signlock.quantization.budget import bits_per_weight_for_file
from hf_signlock.quantization.calibration import hessian_inputs
from hf_signlock.quantization.codecs import make_codec
from hf_signlock.quantization.embedding import SignLockEmbedding, SignLockTiedHead
from hf_signlock.quantization.format.guard import GUARD_KEY
from hf_signlock.quantization.layers import compressed_layers
from hf_signlock.signs import pack_signs
from hf_signlock.targets import find_target_modules, tied_head

CONFIGS = {  # test_quantizer's Llama (untied head) and GPT-2 (tied, Conv1D projections), and a tied Llama
    **QUANTIZER_CONFIGS,
    "llama-tied": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True),
}


def seeded_model(arch: str, moved: float = 1.0):
    """A seeded gap-init model (embeddings and head too) whose targets then moved by ``moved`` init stds."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    targets = apply_gap_init(model, seed=SEED, gap=0.5, embeddings=True)
    with torch.no_grad():
        for t in targets:
            t.param.add_(torch.randn_like(t.param) * t.init_std * moved)
    return model


# --- which modules ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "extra"), [("llama", ["model.embed_tokens", "lm_head"]),
                                             ("llama-tied", ["model.embed_tokens"]), ("gpt2", ["transformer.wte"])])
def test_embedding_targets_tied_once(arch, extra):
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    blocks = find_target_modules(model)
    every = find_target_modules(model, None, embeddings=True)
    assert sorted(set(every) - set(blocks)) == sorted(extra)
    assert list(every) == [name for name, _ in model.named_modules() if name in every]  # model order
    assert tied_head(model) is (arch != "llama")


def test_embeddings_the_codec_cannot_serve_are_refused():
    gemma = AutoModelForCausalLM.from_config(GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                                         vocab_size=64))
    with pytest.raises(SignLockConfigError, match="ScaledWordEmbedding.*plain nn.Embedding.*target_embeddings=False"):
        find_target_modules(gemma, None, embeddings=True)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    model.model.layers[0].mlp.up_proj.weight = model.model.embed_tokens.weight  # shared beyond embedding and head
    with pytest.raises(SignLockConfigError, match="shared with modules other than its LM head"):
        find_target_modules(model, None, embeddings=True)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_gap_init_of_embeddings_follows_the_seed_and_the_models_std(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    targets = {t.name: t for t in apply_gap_init(model, seed=SEED, gap=1.0, embeddings=True)}
    embedding = model.get_input_embeddings()
    name = next(n for n, p in model.named_parameters() if p is embedding.weight)
    assert name in targets and targets[name].init_std == pytest.approx(0.02)  # initializer_range
    weight = embedding.weight.detach()
    assert torch.equal(torch.sign(weight).reshape(-1).to(torch.int8), seeded_signs(SEED, name, weight.numel()))
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert weight.abs().min().item() >= 0.5 * 0.02  # the gap: c(1) * 1 sigma ~ 0.66 sigma
    if arch == "llama":
        head = model.lm_head.weight.detach()
        assert torch.equal(torch.sign(head).reshape(-1).to(torch.int8), seeded_signs(SEED, "lm_head.weight",
                                                                                      head.numel()))
    else:  # tied: one tensor, initialised once
        assert model.get_output_embeddings().weight is embedding.weight


# --- compressed modules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("sign_source", ["seed", "packed"])
def test_exact_round_trip_keeps_logits_and_the_tie(tmp_path, arch, sign_source):
    model = seeded_model(arch)
    dense = model(IDS).logits
    config = SignLockConfig(seed=SEED if sign_source == "seed" else None, sign_source=sign_source, codec="exact",
                            target_embeddings=True)
    quantize_model(model, config)
    assert isinstance(model.get_input_embeddings(), SignLockEmbedding)
    assert isinstance(model.get_output_embeddings(), SignLockTiedHead) is (arch != "llama")
    assert torch.equal(model(IDS).logits, dense)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # dense modules
    assert not compressed_layers(loaded)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) is (arch != "llama")
    assert torch.equal(loaded(IDS).logits, dense)
    kept = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=SignLockConfig(dequantize=False))
    assert isinstance(kept.get_input_embeddings(), SignLockEmbedding)
    assert torch.equal(kept(IDS).logits, dense)
    assert torch.equal(kept.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False),
                       loaded.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False))
    kept.save_pretrained(tmp_path / "again")  # the same bytes back
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    plain = kept.dequantize()
    assert (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight) is (arch != "llama")
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(reloaded(IDS).logits, dense)


CODECS = {"vq": {"bits": 4, "group": 4}, "vq-log8": {"bits": 2, "group": 3, "row_scales": "log8"},
          "vq-layer": {"bits": 2, "group": 5, "row_scales": "layer"}, "signmag": {"bits": 3, "group": 8},
          "signmag-odd": {"bits": 2, "group": 7}, "exact": {}, "scale": {}}


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_lookup_decodes_the_same_rows_as_the_whole_weight(codec, dtype):
    model = seeded_model("llama", moved=0.3)
    name = codec.split("-")[0]
    quantize_model(model, SignLockConfig(seed=SEED, codec=name, codec_params=CODECS[codec], target_embeddings=True))
    embedding = model.get_input_embeddings().to(dtype)
    whole = embedding.decode_weight(dtype=dtype)
    ids = torch.tensor([[0, 5, 63, 5], [17, 2, 40, 63]])
    assert torch.equal(embedding(ids), whole[ids])  # bit for bit, repeated and extreme rows included
    with pytest.raises(IndexError, match="out of range"):
        embedding(torch.tensor([64]))


def test_hessians_of_a_tied_embedding_come_from_the_head():
    model = AutoModelForCausalLM.from_config(CONFIGS["llama-tied"]())
    targets = find_target_modules(model, None, embeddings=True)
    inputs = hessian_inputs(model, targets)
    assert inputs["model.embed_tokens"] is model.lm_head
    untied = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    inputs = hessian_inputs(untied, find_target_modules(untied, None, embeddings=True))
    assert "model.embed_tokens" not in inputs and inputs["lm_head"] is untied.lm_head  # an untied row is one token


def test_signmag_codes_a_tied_embedding_with_the_heads_hessian(tmp_path):
    model = seeded_model("llama-tied", moved=0.3)
    windows = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    from hf_signlock.quantization.calibration import collect_hessians

    targets = find_target_modules(model, None, embeddings=True)
    hessians = collect_hessians(model, windows, hessian_inputs(model, targets))
    assert hessians["model.embed_tokens.weight"].shape == (32, 32)
    dense = model(IDS).logits
    with torch.no_grad():
        plain = quantize_model(seeded_model("llama-tied", moved=0.3),
                               SignLockConfig(seed=SEED, codec="signmag", codec_params={"bits": 2, "group": 8},
                                              target_embeddings=True))(IDS).logits
        calibrated = quantize_model(model, SignLockConfig(seed=SEED, codec="signmag",
                                                          codec_params={"bits": 2, "group": 8},
                                                          target_embeddings=True), hessians)(IDS).logits
    assert (calibrated - dense).square().mean() < (plain - dense).square().mean()


# --- checks -----------------------------------------------------------------------------------------------------------

def _export(tmp_path, arch="llama-tied"):
    model = seeded_model(arch, moved=0.3)
    quantize_model(model, SignLockConfig(seed=SEED, codec="vq", bits_per_weight=3.0, target_embeddings=True))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_an_embedding_checkpoint_without_the_import_is_refused(tmp_path):
    folder = _export(tmp_path)
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0, "a SignLock checkpoint loaded without hf_signlock"
    assert "pip_install_hf-signlock__and__import_hf_signlock" in result.stderr + result.stdout


def test_a_missing_embedding_payload_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _export(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.embed_tokens.weight"]  # the embedding's payload
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="model.embed_tokens.weight: the checkpoint has no"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_an_older_format_without_embeddings_still_loads_and_a_newer_one_is_refused(tmp_path):
    """A format 4 file (payloads as ``<layer>.payload``, one-byte guards, no config checksum) still loads."""
    from safetensors.torch import load_file, save_file

    model = seeded_model("llama")
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    quantization = config["quantization_config"]
    targets = list(find_target_modules(seeded_model("llama")))  # module names, as before compression
    tensors = load_file(tmp_path / "model.safetensors")
    for name in targets:  # the layout of formats 4 to 6
        tensors[f"{name}.payload"] = tensors.pop(f"{name}.weight")
    tensors[f"{targets[0]}.weight"] = torch.zeros(1, dtype=torch.uint8)
    tensors[GUARD_KEY] = torch.zeros(1, dtype=torch.uint8)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    quantization.update(format_version=4, config_checksum=None)
    quantization.pop("target_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, model(IDS).logits)
    quantization["format_version"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SignLockConfigError, match="format version 8.*reads versions 4, 5, 6, 7"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# --- bits and budgets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_the_report_leads_with_the_whole_file_and_its_parts_add_up(tmp_path, arch):
    report = checkpoint_report(_export(tmp_path, arch))
    assert next(iter(report)) == "checkpoint"
    checkpoint = report["checkpoint"]
    files = sum(p.stat().st_size for p in tmp_path.iterdir() if p.suffix == ".safetensors" or p.name in (
        "config.json", "generation_config.json"))
    assert checkpoint["bytes"] == files
    assert sum(checkpoint["bytes_by_part"].values()) == pytest.approx(files, abs=1e-6)
    kinds = {layer["kind"] for layer in report["layers"].values()}
    assert kinds == ({"projection", "embedding", "head"} if arch == "llama" else {"projection", "embedding"})
    # tied weights count once, as parameters and as stored bytes
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    assert checkpoint["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("budget", [4.0, 6.0, 8.0])
def test_a_whole_file_budget_holds(tmp_path, budget):
    model = seeded_model("llama-tied", moved=0.3)
    targets = find_target_modules(model, None, embeddings=True)
    bits_per_weight, derivation = bits_per_weight_for_file(model, targets, budget, torch.bfloat16)
    assert 0 < bits_per_weight < budget
    quantize_model(model, SignLockConfig(seed=SEED, codec="vq", bits_per_weight=bits_per_weight,
                                         target_embeddings=True))
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    checkpoint = checkpoint_report(tmp_path)["checkpoint"]
    assert checkpoint["bits_per_parameter"] <= budget
    assert checkpoint["bytes_by_part"]["dense tensors"] <= derivation["dense_remnant_bytes"]["tensors"]


def test_a_whole_file_budget_the_dense_remnants_exceed_is_refused():
    model = seeded_model("llama")
    with pytest.raises(BudgetError, match="tensors stored dense.*alone take .* bits per parameter.*target_embeddings"):
        bits_per_weight_for_file(model, find_target_modules(model), 1.0, torch.bfloat16)
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(BudgetError, match="finite number > 0"):
            bits_per_weight_for_file(model, find_target_modules(model), bad, torch.bfloat16)


def test_row_signs_read_only_their_rows():
    from hf_signlock.quantization.codecs.base import row_signs

    signs = torch.where(torch.randn(7, 13) >= 0, 1, -1).to(torch.int8)
    rows = torch.tensor([6, 0, 3, 3])
    assert torch.equal(row_signs(pack_signs(signs), 13, rows), signs[rows])
    assert make_codec("exact").decode_row_magnitudes  # every codec can serve a lookup


def test_a_layer_whose_flips_would_cost_more_stores_packed_signs(tmp_path):
    """An LM head left out of the seeded init (as the recipes leave it out of the drift): its signs differ from the
    seed's in half the positions, so it stores them packed, and everything still decodes exactly."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    apply_gap_init(model, seed=SEED, gap=0.5, embeddings=True, lm_head=False)  # the head keeps its ordinary init
    dense = model(IDS).logits
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact", target_embeddings=True))
    assert model.config.quantization_config.packed_layers == [len(compressed_layers(model)) - 1]  # the head, last
    assert model.lm_head.sign_source == "packed" and model.model.embed_tokens.sign_source == "seed"
    model.save_pretrained(tmp_path)
    report = checkpoint_report(tmp_path)
    assert report["layers"]["lm_head.weight"]["signs"] == "packed"
    assert report["layers"]["lm_head.weight"]["sign_bits"] == 64 * 32
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, dense)
    edit_quantization_config(tmp_path, lambda q: q.update(packed_layers=None), reseal=False)
    with pytest.raises(CorruptCheckpointError, match="checksum differs"):  # the config checksum covers the list
        AutoModelForCausalLM.from_pretrained(tmp_path)
    edit_quantization_config(tmp_path, lambda q: None)  # sealed again: the layer then expects coded flips
    with pytest.raises(CorruptCheckpointError, match="lm_head.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _seeded_run(tmp_path, lm_head: bool) -> Path:
    """A run folder of a seeded model whose embedding (and, with ``lm_head``, head) were targets, as the recipe's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    targets = apply_gap_init(model, seed=SEED, gap=0.5, embeddings=True, lm_head=lm_head)
    with torch.no_grad():
        for t in targets:
            t.param.add_(torch.randn_like(t.param) * t.init_std * 0.3)
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "signlock_stats.json").write_text(json.dumps(
        {"seed": SEED, "reference_mode": "seed", "sign_source": "seed", "template_rank": 8,
         "target_embeddings": True, "target_lm_head": lm_head, "target_modules": [t.name for t in targets]}))
    return run


def test_export_cli_budgets_the_whole_file_and_leads_with_it(tmp_path, capsys):
    from safetensors import safe_open

    from hf_signlock.cli import main

    run = _seeded_run(tmp_path, lm_head=False)
    assert main(["export", str(run), str(tmp_path / "out"), "--bits_per_parameter", "6", "--codec", "vq"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads((tmp_path / "out" / "bpw.json").read_text())
    checkpoint = report["checkpoint"]
    assert checkpoint["bits_per_parameter"] <= 6.0 and report["budget"]["bits_per_parameter"] == 6.0
    assert line.startswith(f"{tmp_path / 'out'}: {checkpoint['bytes']:,} bytes, "
                           f"{checkpoint['bits_per_parameter']:.3f} bits per parameter")
    assert f"dense bf16: {checkpoint['dense_bf16_bytes']:,} bytes" in line
    # the untrained head stores packed signs; the seeded embedding coded flips; the norms are bf16
    assert report["layers"]["lm_head.weight"]["signs"] == "packed"
    assert report["layers"]["model.embed_tokens.weight"]["signs"] == "seed"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert handle.get_slice("model.norm.weight").get_dtype() == "BF16"
    assert main(["inspect", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"whole file: {checkpoint['bytes']:,} bytes") and "token embedding" in shown
    assert main(["export", str(run), str(tmp_path / "tiny"), "--bits_per_parameter", "2", "--codec", "vq",
                 "--target_embeddings", "false"]) == 2  # the dense embeddings alone take more than 2 bits a parameter
    assert re.search("tensors stored dense .* alone take 3.7.. bits per parameter", capsys.readouterr().err)
    assert main(["export", str(run), str(tmp_path / "both"), "--bits_per_parameter", "6", "--bits_per_weight", "6"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "both").exists()


def test_the_flip_rate_of_an_export_counts_its_seeded_layers_only(tmp_path):
    """Against the export's recorded seed: the projections and the embedding, not the head whose signs it stores
    packed (they never followed the seed), whether the export is loaded dense or kept compressed."""
    from hf_signlock.evaluation.references import resolve_reference
    from hf_signlock.evaluation.sign_metrics import flip_report

    run = _seeded_run(tmp_path, lm_head=False)
    model = AutoModelForCausalLM.from_pretrained(run)
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact", target_embeddings=True))
    model.save_pretrained(tmp_path / "out")
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(
            tmp_path / "out", quantization_config=SignLockConfig(dequantize=False))):
        report = flip_report(loaded, resolve_reference(str(tmp_path / "out"), None, loaded))
        assert "model.embed_tokens.weight" in report["layers"] and "lm_head.weight" not in report["layers"]
        assert report["flip_rate"] < 0.05  # the head's ~50% would dominate


def test_pipeline_runs_on_an_export_with_compressed_embeddings(tmp_path):
    from transformers import pipeline

    from hf_signlock.data import train_tokenizer

    tokenizer = train_tokenizer(["to be or not to be, that is the question"] * 20, 300)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    apply_gap_init(model, seed=SEED, gap=0.5, embeddings=True)
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact", target_embeddings=True))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected = model.generate(tokenizer("to be or", return_tensors="pt").input_ids, max_new_tokens=4, do_sample=False)
    for dequantize in (True, False):
        generator = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=SignLockConfig(dequantize=dequantize)), tokenizer=tokenizer)
        text = generator("to be or", max_new_tokens=4, do_sample=False)[0]["generated_text"]
        assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
