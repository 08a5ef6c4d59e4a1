"""SignLock export: exact signs, bit-identical logits with the exact codec, save -> from_pretrained round trips,
and every kind of bad checkpoint refused with the layer's name."""

import json
import re

import pytest
import torch
from checkpoint_edits import edit_quantization_config
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

from hf_signlock import CorruptCheckpointError, SignLockConfig, SignLockConfigError, apply_gap_init, quantize_model
from hf_signlock.quantization.linear import SignLockLinear
from hf_signlock.targets import find_target_modules

CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                               eos_token_id=0),
}
SEED = 3


def trained_model(arch: str, config=None, moved: float = 1.0):
    """A seeded gap-init model whose weights then moved by ``moved`` init stds of noise, so that some signs
    flipped (about 2% at 1.0)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config or CONFIGS[arch]()).eval()
    targets = apply_gap_init(model, seed=SEED, gap=0.5)
    with torch.no_grad():
        for t in targets:
            t.param.add_(torch.randn_like(t.param) * t.init_std * moved)
    return model


def assert_same_signs(after: dict, before: dict):
    """Every target weight kept its sign exactly (torch.sign: a zero must stay zero)."""
    for name, weight in before.items():
        assert torch.equal(torch.sign(after[name]), torch.sign(weight)), name


def dense_weights(model):
    return {f"{n}.weight": m.weight.detach().clone() for n, m in find_target_modules(model, None).items()}


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def compressed(model) -> list[SignLockLinear]:
    return [module for module in model.modules() if isinstance(module, SignLockLinear)]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("sign_source", ["seed", "packed"])
def test_exact_codec_round_trip_is_bit_identical(tmp_path, arch, sign_source):
    model = trained_model(arch)
    dense = model(IDS).logits
    config = SignLockConfig(seed=SEED if sign_source == "seed" else None, sign_source=sign_source, codec="exact")
    quantize_model(model, config)
    assert any(layer.flips for layer in compressed(model)) if sign_source == "seed" else True
    assert torch.equal(model(IDS).logits, dense)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, SignLockLinear) for m in loaded.modules())  # dequantized on load
    assert torch.equal(loaded(IDS).logits, dense)


def test_compressed_modules_load_when_asked(tmp_path):
    model = trained_model("llama")
    dense = model(IDS).logits
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact", dequantize=False))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(isinstance(m, SignLockLinear) for m in loaded.modules()) == 14
    assert torch.equal(loaded(IDS).logits, dense)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_lossy_codec_keeps_every_sign(tmp_path, arch):
    model = trained_model(arch)
    before = dense_weights(model)
    quantize_model(model, SignLockConfig(seed=SEED, codec="scale"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    after = dense_weights(loaded)
    assert_same_signs(after, before)
    assert not any(torch.equal(after[name], weight) for name, weight in before.items())  # the codec is lossy


def _export(tmp_path, **overrides):
    model = trained_model("llama")
    quantize_model(model, SignLockConfig(**{"seed": SEED, "codec": "scale", **overrides}))
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, edit, reseal=True):
    """Edit the export's quantization_config; resealed (as a forger would) unless asked not to, so the checks behind
    the config checksum are reached."""
    edit_quantization_config(folder, edit, reseal)


def test_wrong_seed_is_refused(tmp_path):
    folder = _export(tmp_path)
    _edit_config(folder, lambda q: q.update(seed=SEED + 1))
    with pytest.raises(CorruptCheckpointError, match=r"model\.layers\.0\..*decoded signs.*seed \(4\)"):
        AutoModelForCausalLM.from_pretrained(folder)


def _edit_records(folder, edit):
    """Decode the layer records of ``folder``'s config, ``edit`` them (a dict by parameter name), store them back."""
    def rewrite(q):
        config = SignLockConfig.from_dict(q)
        shapes = {f"{name}.weight": tuple(module.weight.shape) for name, module in find_target_modules(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)), config.target_modules).items()}
        records = config.layer_records(list(shapes))
        edit(records)
        config.set_layer_records(records, shapes)
        q.update(layers=config.layers)
    _edit_config(folder, rewrite)


def _records(folder) -> dict:
    records = {}
    _edit_records(folder, records.update)
    return records


def _section(folder, tensors, param_name, name):
    """The bytes of stored tensor ``name`` inside layer ``param_name``'s payload (a writable copy in ``tensors``)."""
    config = SignLockConfig.from_dict(json.loads((folder / "config.json").read_text())["quantization_config"])
    module = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).get_submodule(
        param_name.removesuffix(".weight"))
    offset, nbytes, _, _ = SignLockLinear.like(module, param_name, _records(folder)[param_name], config).sections[name]
    key = param_name  # format 7: the payload is stored under the dense weight's own name
    tensors[key] = tensors[key].clone()
    return tensors[key][offset:offset + nbytes]


def _add_one(folder, tensors, param_name="model.layers.1.mlp.up_proj.weight", name="row_scale"):
    _section(folder, tensors, param_name, name)[3] += 1


def _flip_a_bit(folder, tensors):
    _section(folder, tensors, "model.layers.0.self_attn.q_proj.weight", "flips")[-6] ^= 0x10


def _drop(folder, tensors):
    del tensors["model.layers.0.mlp.down_proj.weight"]  # the layer's payload


@pytest.mark.parametrize("damage, message", [
    (_add_one, r"model\.layers\.1\.mlp\.up_proj\.weight: the stored payload"),
    (_flip_a_bit, r"model\.layers\.0\.self_attn\.q_proj\.weight: "),
    (_drop, r"model\.layers\.0\.mlp\.down_proj\.weight: the checkpoint has no `model\.layers\.0\.mlp\.down_proj\.weight`"),
], ids=["corrupted-tensor", "corrupted-flip-stream", "missing-tensor"])
def test_damaged_checkpoint_is_refused(tmp_path, damage, message):
    folder = _export(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    damage(folder, tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_sharded_checkpoint_round_trips_and_a_missing_payload_in_any_shard_is_refused(tmp_path):
    model = trained_model("llama")
    dense = model(IDS).logits
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact"))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, dense)
    last = load_file(shards[-1])
    key = next(k for k in last if k.endswith(".weight") and last[k].dtype == torch.uint8)  # a payload
    del last[key]
    save_file(last, shards[-1], metadata={"format": "pt"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=rf"the checkpoint has no `{re.escape(key)}` tensor"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_bias_is_refused_not_left_uninitialised(tmp_path):
    """No ``_init_weights`` knows SignLockLinear: a bias transformers reports missing would hold stale memory."""
    model = trained_model("gpt2")
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact"))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["transformer.h.0.mlp.c_fc.bias"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight: the checkpoint has no "
                                                     r"`transformer\.h\.0\.mlp\.c_fc\.bias`"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_payload_is_refused_before_loading(tmp_path):
    """Read from the safetensors header: transformers would otherwise report a size mismatch, or with
    ``ignore_mismatched_sizes`` fill the payload with uninitialised memory."""
    folder = _export(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"  # its payload
    size = tensors[key].numel()
    tensors[key] = tensors[key][:-3].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = rf"model\.layers\.0\.mlp\.down_proj\.weight: the stored payload has shape \[{size - 3}\], the layer record needs \[{size}\]"
    for ignore_mismatched_sizes in (False, True):
        with pytest.raises(CorruptCheckpointError, match=message):
            AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=ignore_mismatched_sizes)


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(format_version=9), "format version 9"),
    (lambda q: q.update(codec="zip"), "`codec` must be one of"),
    (lambda q: q.update(sign_source="dice"), "`sign_source` must be one of"),
])
def test_unknown_format_or_codec_is_refused(tmp_path, edit, message):
    folder = _export(tmp_path)
    _edit_config(folder, edit, reseal=False)
    with pytest.raises(SignLockConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_seed_required_unless_packed():
    with pytest.raises(SignLockConfigError, match="pass `seed`"):
        quantize_model(trained_model("llama"), SignLockConfig(sign_source="seed"))
    with pytest.raises(SignLockConfigError, match="pass `seed`"):  # a checkpoint's config without its seed
        SignLockConfig(sign_source="seed", layers="")


@pytest.mark.parametrize("codec", ["exact", "scale"])
def test_dequantized_layers_follow_the_requested_dtype(tmp_path, codec):
    """Stored tensors keep their own dtype (so checksums hold); the dense layers take the model's."""
    model = trained_model("llama")
    dense = dense_weights(model)
    quantize_model(model, SignLockConfig(seed=SEED, codec=codec))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    weight = loaded.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16
    if codec == "exact":
        assert torch.equal(weight, dense["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16))
    assert loaded(IDS).logits.isfinite().all()


def _run_folder(tmp_path, with_stats=True, model=None):
    model = model or trained_model("llama")
    run = tmp_path / "run"
    model.save_pretrained(run)
    if with_stats:
        (run / "signlock_stats.json").write_text(json.dumps(
            {"seed": SEED, "reference_mode": "seed", "sign_source": "seed", "template_rank": 8,
             "target_modules": list(dense_weights(model))}))
    return model, run


def test_export_cli_writes_bpw_and_inspect_counts_the_files(tmp_path, capsys):
    from hf_signlock.cli import main

    model, run = _run_folder(tmp_path)
    assert main(["export", str(run), str(tmp_path / "out"), "--codec", "scale"]) == 0
    report = json.loads((tmp_path / "out" / "bpw.json").read_text())
    fields = ("weights", "flips", "sign_bits", "magnitude_bits", "other_bits", "total_bits")
    assert set(report["total"]) == set(fields)
    for field in fields:
        assert report["total"][field] == pytest.approx(sum(layer[field] for layer in report["layers"].values()))
    layer = report["layers"]["model.layers.0.mlp.up_proj.weight"]
    assert layer["weights"] == 64 * 32 and layer["magnitude_bits"] == 16 * (64 + 32)
    assert layer["total_bits"] == layer["sign_bits"] + layer["magnitude_bits"] + layer["other_bits"]
    assert report["bpw"] == report["total"]["total_bits"] / report["total"]["weights"]
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert layer["sign_bits"] == 8 * _section(tmp_path / "out", stored, "model.layers.0.mlp.up_proj.weight", "flips").numel()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "bits per parameter" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_signs(dense_weights(loaded), dense_weights(model))


def test_unknown_refinement_objective_is_refused(tmp_path):
    from hf_signlock.quantization.export import export_run

    _, run = _run_folder(tmp_path)
    with pytest.raises(SignLockConfigError, match="`refine_loss` must be 'lm' or 'teacher'"):
        export_run(run, tmp_path / "out", codec="scale", refine_steps=5, refine_loss="mse")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_card_reports_the_refinement(tmp_path):
    from hf_signlock.cards import export_card as render_card
    from hf_signlock.cli import main

    _, run = _run_folder(tmp_path)
    main(["export", str(run), str(tmp_path / "out"), "--codec", "scale"])
    assert "refinement" not in str(render_card(tmp_path / "out", "user/tiny"))
    path = tmp_path / "out" / "bpw.json"
    report = json.loads(path.read_text())
    report["refinement"] = {"steps": 200, "learning_rate": 0.003, "loss": "teacher", "first_loss": 1.5, "last_loss": 0.25}
    path.write_text(json.dumps(report))
    card = str(render_card(tmp_path / "out", "user/tiny"))
    assert "| refinement of the codec tables, signs fixed | 200 AdamW steps at lr 0.003 on the training text, " \
           "KL from the dense model (teacher): 1.500 -> 0.250 |" in card


def test_export_without_seeded_init_uses_packed_signs(tmp_path):
    from hf_signlock.quantization.export import export_run

    model, run = _run_folder(tmp_path, with_stats=False)
    report = export_run(run, tmp_path / "out", codec="exact", dtype="float32")  # the norms kept in float32
    assert report["sign_source"] == "packed"
    assert report["total"]["sign_bits"] >= report["total"]["weights"]  # one stored bit per sign
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_inspect_refuses_a_folder_that_is_no_signlock_checkpoint(tmp_path, capsys):
    from hf_signlock.cli import main

    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a SignLock checkpoint" in capsys.readouterr().err
    _, run = _run_folder(tmp_path)
    assert main(["inspect", str(run)]) == 2
    assert "not a SignLock checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("codec, budget", [("vq", 0.5), ("vq", 1.0), ("lowrank", 1.0)])
def test_budget_is_met_in_total_and_signs_stay_exact(tmp_path, codec, budget):
    from hf_signlock.quantization.bits import write_bits_report

    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    model = trained_model("llama", config, moved=0.3)
    before = dense_weights(model)
    quantize_model(model, SignLockConfig(seed=SEED, codec=codec, bits_per_weight=budget))
    model.save_pretrained(tmp_path)
    report = write_bits_report(tmp_path)
    assert report["bpw"] <= budget
    total = report["total"]  # the magnitudes share alike what signs, biases and records leave of the budget
    share = (budget * total["weights"] - total["sign_bits"] - total["other_bits"]) / total["weights"]
    assert all(layer["magnitude_bits"] <= share * layer["weights"] for layer in report["layers"].values())
    assert report["bpw"] >= 0.6 * budget  # and mostly spent
    after = dense_weights(AutoModelForCausalLM.from_pretrained(tmp_path,
                                                               quantization_config=SignLockConfig(dequantize=True)))
    assert_same_signs(after, before)


def test_shared_codebook_export_round_trips_and_needs_its_owner(tmp_path):
    """At 0.05 bpw the layers of this model cannot each keep a codebook: one is shared, stored by the first layer.
    (Width 256: at width 128 the honest per-layer overhead, header entries and record, leaves too little for any
    codebook at such budgets; at 0.1 each 256-wide layer still fits its own.)"""
    from hf_signlock.quantization.bits import write_bits_report

    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    model = trained_model("llama", config, moved=0.1)  # no flips, as with the regulariser: 0.05 bpw is reachable
    before = dense_weights(model)
    quantize_model(model, SignLockConfig(seed=SEED, codec="vq", bits_per_weight=0.05, dequantize=False))
    owners = [layer.param_name for layer in compressed(model) if layer.codec_params.get("codebook_owner")]
    assert owners == ["model.layers.0.mlp.down_proj.weight"]  # the first target in name order
    assert all(layer.codec_params["shared"] for layer in compressed(model))
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    report = write_bits_report(tmp_path)
    assert 0.025 < report["bpw"] <= 0.05
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(IDS).logits, logits)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=SignLockConfig(dequantize=True))
    assert not any(isinstance(m, SignLockLinear) for m in dense.modules())  # the loader's choice wins
    assert_same_signs(dense_weights(dense), before)
    tensors = load_file(tmp_path / "model.safetensors")
    _add_one(tmp_path, tensors, owners[0], "codebook")  # the shared codebook is checked with its owner
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: the stored payload"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _edit_records(tmp_path, lambda records: records[owners[0]]["codec_params"].pop("codebook_owner"))
    with pytest.raises(CorruptCheckpointError, match="shares a vq codebook, but 0 layers"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_loading_without_hf_signlock_fails_loudly(tmp_path):
    """The forgotten-import trap: plain transformers must refuse the checkpoint, never randomly initialise it."""
    import subprocess
    import sys

    folder = _export(tmp_path)
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            "assert 'hf_signlock' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0, "a SignLock checkpoint loaded without hf_signlock"
    assert "pip_install_hf-signlock__and__import_hf_signlock" in result.stderr + result.stdout
    assert "size mismatch" in result.stderr or "ignore_mismatched_sizes" in result.stderr
    quiet = subprocess.run([sys.executable, "-c", "import hf_signlock\n" + code.replace("assert 'hf_signlock' not", "#")],
                           capture_output=True, text=True, timeout=120, check=False)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "LOAD REPORT" not in quiet.stderr  # with hf_signlock imported the guards are expected: no warnings


def _kl_from(teacher, model, ids):
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids).logits, -1)
        return torch.nn.functional.kl_div(torch.log_softmax(model(input_ids=ids).logits, -1), target,
                                          log_target=True, reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("objective", ["lm", "teacher"])
def test_refinement_trains_tables_and_keeps_signs(tmp_path, objective):
    import copy

    from datasets import Dataset

    from hf_signlock.evaluation.perplexity import perplexity
    from hf_signlock.quantization.refine import refine, train_steps

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32)
    model = trained_model("llama", config, moved=0.3)
    blocks = torch.arange(32).repeat(40)[: 40 * 16].view(40, 16) % 32  # a learnable, periodic language
    data = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    if objective == "teacher":  # a teacher worth following: the dense model first learns the language a little
        train_steps(model, list(model.parameters()), data, 20, 1e-2, batch_size=8)
    teacher = copy.deepcopy(model)
    before = dense_weights(model)
    quantize_model(model, SignLockConfig(seed=SEED, codec="vq", codec_params={"bits": 4, "group": 8}))
    ids = torch.tensor(data["input_ids"][:8])
    start, start_kl = perplexity(model, data)["eval_loss"], _kl_from(teacher, model, ids)
    report = refine(model, data, steps=30, learning_rate=3e-2 if objective == "lm" else 3e-3, batch_size=8,
                    teacher=teacher if objective == "teacher" else None)
    assert report["loss"] == objective and report["last_loss"] < report["first_loss"]
    if objective == "lm":
        assert perplexity(model, data)["eval_loss"] < start - 0.1
    else:  # pulled toward the dense model's predictions
        assert _kl_from(teacher, model, ids) < 0.7 * start_kl
    model.save_pretrained(tmp_path)
    # checksums renewed: it loads (dense modules, dequantize=True; the default keeps it compressed)
    after = dense_weights(AutoModelForCausalLM.from_pretrained(tmp_path,
                                                               quantization_config=SignLockConfig(dequantize=True)))
    assert_same_signs(after, before)


def test_export_with_no_flags_uses_the_python_defaults(tmp_path):
    """`hf-signlock export RUN OUT` works as is: vq at 1 bit per weight, as `export_run` and `SignLockConfig`."""
    import inspect

    from hf_signlock.cli import main, make_parser
    from hf_signlock.quantization.export import export_run

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    _, run = _run_folder(tmp_path, model=trained_model("llama", config, moved=0.3))
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bpw.json").read_text())
    assert report["codec"] == "vq" and 0.8 < report["bpw"] <= 1.0
    for spelling in ("--bits_per_weight", "--bits-per-weight"):  # one style, the Python name; dashes accepted
        assert main(["export", str(run), str(tmp_path / spelling), spelling, "0.5"]) == 0
        assert json.loads((tmp_path / spelling / "bpw.json").read_text())["bpw"] <= 0.5
    parsed = vars(make_parser().parse_args(["export", "run", "out"]))
    for name, parameter in inspect.signature(export_run).parameters.items():
        if name in parsed and parameter.default is not inspect.Parameter.empty:
            assert parsed[name] == parameter.default, name


@pytest.mark.parametrize("kwargs, budget", [
    ({}, 1.0), ({"codec": "lowrank"}, 1.0), ({"codec_params": {"shared": True}}, 1.0),  # codecs that fit a budget
    ({"codec": "exact"}, None), ({"codec": "scale"}, None),  # fixed size: no default budget to refuse
    ({"codec_params": {"bits": 4, "group": 8}}, None), ({"codec": "lowrank", "codec_params": {"rank": 2}}, None),
    ({"bits_per_weight": 0.3}, 0.3),
])
def test_default_budget_is_the_codecs(kwargs, budget):
    assert SignLockConfig(**kwargs).budget == budget


def test_layers_without_flips_store_no_flip_stream(tmp_path):
    """A seeded model whose signs never moved (what the regulariser aims at) pays no sign bits at all."""
    model = trained_model("llama", moved=0.0)
    logits = model(IDS).logits
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact"))
    assert all(layer.flips == 0 and layer.sections["flips"][1] == 0 for layer in compressed(model))
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(IDS).logits, logits)
    from hf_signlock.quantization.bits import write_bits_report

    assert write_bits_report(tmp_path)["total"]["sign_bits"] == 0
    _edit_config(tmp_path, lambda q: q.update(seed=SEED + 1))  # the sign checksum still guards the seed
    with pytest.raises(CorruptCheckpointError, match="decoded signs"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
