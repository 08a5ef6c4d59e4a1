"""Reference signs from every source, the bad inputs they refuse, ``analyze`` end to end (CLI, JSON, report,
figures) and the ``evaluate`` flip-rate module, on tiny Llama models built from configs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from hf_signlock import SignLockConfig, quantize_model
from hf_signlock.constants import STATE_NAME, STATS_NAME
from hf_signlock.errors import MissingDependencyError, ModelLoadError, SignLockConfigError
from hf_signlock.evaluation.analyze import analyze, sample_layers
from hf_signlock.evaluation.loading import load_causal_lm
from hf_signlock.evaluation.references import resolve_reference
from hf_signlock.evaluation.sign_metrics import flip_report
from hf_signlock.signs import reference_signs
from hf_signlock.targets import find_target_modules
from hf_signlock.training.tracking import geometric_tail_ratio

SEED = 5
FLIPPED = "model.layers.1.mlp.up_proj.weight"
FLIPS = 4  # three negated weights and a zero
HISTOGRAM = [60000, 30, 9, 3, 1]
METRIC = Path(__file__).resolve().parent.parent / "hf_signlock" / "evaluation" / "metrics" / "flip_rate"


def llama(hidden: int = 32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))


def param_names(model) -> list[str]:
    return [f"{name}.weight" for name in find_target_modules(model)]


def seeded_llama():
    """Target weights with exactly the signs of seed SEED (magnitudes 0.01 to 1)."""
    model = llama()
    with torch.no_grad():
        for name, module in find_target_modules(model).items():
            s0 = reference_signs(SEED, f"{name}.weight", module.weight.shape)
            module.weight.copy_(s0 * (0.01 + torch.rand_like(module.weight)))
    return model


def flip_some(model):
    weight = dict(model.named_parameters())[FLIPPED]
    s0 = reference_signs(SEED, FLIPPED, weight.shape)
    with torch.no_grad():
        weight[0, :3].neg_()
        # a zero where s0 is -1: a flip for the metrics (zero counts as flipped) and for export (zero is stored +1)
        weight[5, int((s0[5] < 0).nonzero()[0])] = 0.0


def write_stats(folder: Path, **fields):
    stats = {"seed": SEED, "reference_mode": "seed", "sign_source": "seed", "template_rank": 8,
             "crossing_histogram": HISTOGRAM, "flip_tracking_steps": 10, "flip_rate": FLIPS / 60000,
             "near_zero_fraction": 0.0, **fields}
    (folder / STATS_NAME).write_text(json.dumps(stats))


def write_captured_state(folder: Path, start_model):
    """What SignLockTrainer.save_signlock_state writes for a captured run (its real classes)."""
    from hf_signlock.training.init_distribution import resolve_targets
    from hf_signlock.training.reference import SignReference
    from hf_signlock.training.tracking import FlipTracker

    reference = SignReference.capture(resolve_targets(start_model, init_std=0.02))
    tracker = FlipTracker(reference)
    tracker.observe(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({**tracker.state_dict(), **reference.state_dict()}, str(folder / STATE_NAME),
              metadata={"format_version": "1", "reference_mode": "captured", "sign_seed": "42", "last_step": "0",
                        "last": json.dumps(tracker.last)})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """initial: the seeded start; run: it with FLIPS flips and its stats; export: a SignLock export of the run;
    captured: a captured-mode run with its starting signs in a checkpoint; plain: a model recording nothing."""
    root = tmp_path_factory.mktemp("analyze")
    model = seeded_llama()
    model.save_pretrained(root / "initial")
    flip_some(model)
    model.save_pretrained(root / "run")
    write_stats(root / "run", target_modules=param_names(model))
    model.save_pretrained(root / "run" / "checkpoint-2")  # a seeded run's checkpoint: its state's metadata counts
    save_file({"agree.unused": torch.zeros(1, dtype=torch.bool)}, str(root / "run" / "checkpoint-2" / STATE_NAME),
              metadata={"format_version": "1", "reference_mode": "seed", "sign_seed": str(SEED), "last_step": "2",
                        "last": "{}"})
    quantize_model(model, SignLockConfig(seed=SEED, codec="exact"))
    model.save_pretrained(root / "export")
    start = load_causal_lm(root / "initial")
    trained = load_causal_lm(root / "run")
    trained.save_pretrained(root / "captured")
    write_stats(root / "captured", reference_mode="captured", seed=42, target_modules=param_names(trained))
    write_captured_state(root / "captured" / "checkpoint-3", start)
    trained.save_pretrained(root / "captured-nostate")  # its starting model inside it: followed
    start.save_pretrained(root / "captured-nostate" / "start")
    write_stats(root / "captured-nostate", reference_mode="captured", seed=42, model_name_or_path="start",
                target_modules=param_names(trained))
    trained.save_pretrained(root / "captured-elsewhere")  # a starting model outside it: not followed
    write_stats(root / "captured-elsewhere", reference_mode="captured", seed=42,
                model_name_or_path=str(root / "initial"), target_modules=param_names(trained))
    llama().save_pretrained(root / "plain")
    return root


def flips_against(folders, model_folder, reference):
    model = load_causal_lm(folders / model_folder)
    resolved = resolve_reference(str(folders / model_folder), reference, model)
    return flip_report(model, resolved)


@pytest.mark.parametrize("model_folder, reference, description", [
    ("run", None, f"seed {SEED} (seed signs) recorded in"),
    ("run", f"seed:{SEED}", f"seed {SEED} (seed signs)"),
    ("run", SEED, f"seed {SEED} (seed signs)"),
    ("run", "initial", "signs of the dense checkpoint"),
    ("initial", "export", "stored signs of the SignLock export"),
    ("export", None, "recorded in the export's config.json"),
    ("export", "initial", "signs of the dense checkpoint"),
    ("captured", None, "captured starting signs in"),
    ("captured-nostate", None, "the run's starting model"),
    ("run/checkpoint-2", None, f"seed {SEED} (seed signs) recorded in"),
])
def test_reference_from_every_source(folders, model_folder, reference, description):
    if isinstance(reference, str) and not reference.startswith("seed"):
        reference = str(folders / reference)
    report = flips_against(folders, model_folder, reference)
    assert description in report["reference"]
    assert report["flips"] == FLIPS
    assert report["layers"][FLIPPED] == pytest.approx(FLIPS / (64 * 32))


def test_a_starting_model_the_stats_name_outside_the_run_is_not_followed(folders):
    with pytest.raises(SignLockConfigError, match=r"model_name_or_path .*initial.* outside it.*--reference"):
        flips_against(folders, "captured-elsewhere", None)
    assert flips_against(folders, "captured-elsewhere", str(folders / "initial"))["flips"] == FLIPS  # when asked


def test_same_signs_give_no_flips_but_a_zero_weight_is_always_one(folders):
    assert flips_against(folders, "initial", f"seed:{SEED}")["flips"] == 0
    assert flips_against(folders, "initial", str(folders / "initial"))["flips"] == 0
    # the run's one zero weight: the export stores its sign as +1 (and the exact codec keeps the 0), while a zero
    # always counts as flipped; so against the export's own signs that zero is the one flip left
    assert flips_against(folders, "run", str(folders / "export"))["flips"] == 1
    assert flips_against(folders, "export", str(folders / "export"))["flips"] == 1


def test_a_model_that_records_nothing_has_no_reference(folders):
    model = load_causal_lm(folders / "plain")
    assert resolve_reference(str(folders / "plain"), None, model) is None
    assert flip_report(model, None)["flip_rate"] is None


def test_captured_run_without_its_signs_names_the_argument(folders, tmp_path):
    load_causal_lm(folders / "run").save_pretrained(tmp_path)
    write_stats(tmp_path, reference_mode="captured", model_name_or_path="someone/gone")
    with pytest.raises(SignLockConfigError, match="--reference"):
        resolve_reference(str(tmp_path), None)
    # a reference given explicitly still works
    assert resolve_reference(str(tmp_path), f"seed:{SEED}").seed == SEED


def test_folder_without_weights_is_refused(folders, tmp_path):
    (tmp_path / "config.json").write_text((folders / "run" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"--reference .* has no weights"):
        resolve_reference(str(folders / "run"), str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"--reference .* does not exist"):
        resolve_reference(str(folders / "run"), "./no/such/folder")


def test_reference_of_another_architecture_is_refused(folders, tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)) \
        .save_pretrained(tmp_path)
    model = load_causal_lm(folders / "run")
    with pytest.raises(ModelLoadError, match=r"--reference .*'gpt2' model but MODEL is a 'llama'"):
        resolve_reference(str(folders / "run"), str(tmp_path), model)


def test_reference_of_another_shape_is_refused(folders, tmp_path):
    llama(hidden=48).save_pretrained(tmp_path)
    model = load_causal_lm(folders / "run")
    with pytest.raises(ModelLoadError, match=r"--reference .*shape \[48, 48\].*MODEL has shape \[32, 32\]"):
        resolve_reference(str(folders / "run"), str(tmp_path), model)


def test_a_seed_at_chance_level_is_refused_naming_the_recorded_seed(folders):
    model = load_causal_lm(folders / "run")
    with pytest.raises(SignLockConfigError, match=r"--reference \(seed 6 .*about what random signs give"):
        resolve_reference(str(folders / "run"), "seed:6", model)
    with pytest.raises(SignLockConfigError, match=rf"MODEL records seed {SEED}: leave --reference out"):
        resolve_reference(str(folders / "run"), "seed:6", model)
    plain = load_causal_lm(folders / "plain")
    with pytest.raises(SignLockConfigError, match="MODEL records no seed"):
        resolve_reference(str(folders / "plain"), f"seed:{SEED}", plain)


def test_recorded_seed_that_does_not_fit_is_refused(folders, tmp_path):
    load_causal_lm(folders / "plain").save_pretrained(tmp_path)
    write_stats(tmp_path)  # stats of another run beside these weights
    with pytest.raises(SignLockConfigError, match="the reference MODEL records .* --reference"):
        resolve_reference(str(tmp_path), None, load_causal_lm(tmp_path))


@pytest.mark.parametrize("bad", ["seed:x", "template:1:2:3", "seed:1:4"])
def test_malformed_seed_is_refused(folders, bad):
    with pytest.raises(SignLockConfigError, match="--reference"):
        resolve_reference(str(folders / "run"), bad)


def test_template_reference_uses_its_rank(folders):
    reference = resolve_reference(str(folders / "run"), "template:3:2")
    assert (reference.sign_source, reference.seed, reference.template_rank) == ("template", 3, 2)
    expected = reference_signs(3, FLIPPED, (64, 32), "template", 2)
    assert torch.equal(reference.signs(FLIPPED, (64, 32)), expected)


def test_sample_layers_covers_every_kind_of_projection():
    names = [f"model.layers.{b}.{kind}.weight" for b in range(30)
             for kind in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")]
    chosen = sample_layers(names, 6)
    assert len(chosen) == 6 and chosen == sorted(chosen, key=names.index)
    assert {name.split(".", 3)[3] for name in chosen} == {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                           "mlp.up_proj.weight"}
    assert "model.layers.0.self_attn.q_proj.weight" in chosen and "model.layers.29.mlp.up_proj.weight" in chosen


def test_analyze_cli_writes_json_report_and_figures(folders, tmp_path, capsys):
    from hf_signlock.cli import main

    out = tmp_path / "out"
    assert main(["analyze", str(folders / "run"), "--output", str(out), "--ranks", "1,4,100"]) == 0
    printed = capsys.readouterr().out
    assert "flip rate" in printed and "rank-r error of sign(W)" in printed
    analysis = json.loads((out / "analysis.json").read_text())
    total, layers = analysis["total"], analysis["layers"]
    assert len(layers) == 14 and total["layers_tested"] == 14
    weights = sum(layer["weights"] for layer in layers)
    assert total["flips"] == FLIPS and total["flip_rate"] == pytest.approx(FLIPS / weights)
    for layer in layers:
        assert set(layer) >= {"name", "flip_rate", "near_zero_fraction", "ks_statistic", "ks_pvalue", "rank_error"}
        assert 0 <= layer["ks_statistic"] <= 1 and 0 <= layer["ks_pvalue"] <= 1
        assert layer["rank_error"]["sign"][-1] == 0.0  # rank 100 >= every dimension: nothing left
        assert layer["rank_error"]["abs"][0] < layer["rank_error"]["sign"][0]  # |W| has its rank-1 mean
    assert analysis["settings"]["ranks"] == [1, 4, 100]
    assert analysis["settings"]["near_zero_scale"] == "the layer's init std"  # a run: as training reports it
    assert analysis["training"]["geometric_tail_ratio"] == pytest.approx(geometric_tail_ratio(HISTOGRAM))
    assert analysis["training"]["geometric_tail_ratio"] == pytest.approx((9 + 3 + 1 + 3 + 1 + 1) / (43 + 13 + 4 + 1))
    assert set(analysis["figures"]) == {"spectra.png", "rank_errors.png", "flips.png", "crossings.png"}
    for name in analysis["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "analysis.md").read_text()
    assert "**Flip rate**" in report and "Crossing counts" in report and "![spectra.png](spectra.png)" in report
    assert "| mlp.up_proj | 2 |" in report


def test_analyze_of_a_plain_model_with_a_sample_and_chosen_targets(folders):
    result = analyze(str(folders / "plain"), sample=2, target_modules=["q_proj", "v_proj"], ranks=(2,))
    assert [layer["name"].split(".")[-2] for layer in result["layers"]] == ["q_proj", "v_proj"] * 2
    assert result["reference"] is None and result["total"]["flip_rate"] is None
    assert result["total"]["layers_tested"] == 2
    assert [layer["ks_pvalue"] is not None for layer in result["layers"]] == [True, True, False, False]
    assert result["settings"]["near_zero_scale"] == "the layer's own std"
    assert result["training"] is None


def test_analyze_refuses_bad_settings_and_missing_matplotlib(folders, tmp_path, monkeypatch):
    import sys

    with pytest.raises(SignLockConfigError, match="ranks"):
        analyze(str(folders / "plain"), ranks=(0,))
    with pytest.raises(SignLockConfigError, match="sample"):
        analyze(str(folders / "plain"), sample=0)
    with pytest.raises(ModelLoadError, match="MODEL"):
        analyze(str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "hf-signlock\[analysis\]"'):
        analyze(str(folders / "plain"), output_dir=tmp_path)


def test_flip_rate_evaluate_module_loads_by_path(folders):
    import evaluate

    metric = evaluate.load(str(METRIC))
    assert metric.compute(predictions=[0.5, -0.2, 0.0, 0.1], references=[1, 1, 1, -1]) == {
        "flip_rate": 0.75, "flips": 3, "weights": 4}
    metric.add_batch(predictions=[0.5, -0.1], references=[1, -1])
    metric.add_batch(predictions=[0.0], references=[-1])
    assert metric.compute()["flips"] == 1
    result = metric.compute(model=str(folders / "run"))
    assert result["flips"] == FLIPS and "recorded in" in result["reference"]
    assert metric.compute(model=str(folders / "initial"), reference=str(folders / "export"))["flips"] == FLIPS


@pytest.mark.slow
def test_analyze_a_real_pretrained_model_on_a_sample():
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    from real_model import NUM_LAYERS, TARGET_SUFFIXES, smollm2_folder

    start = time.perf_counter()
    result = analyze(str(smollm2_folder()), sample=14, ranks=(1, 32))
    assert time.perf_counter() - start < 120
    assert result["total"]["layers"] == NUM_LAYERS * len(TARGET_SUFFIXES) and result["total"]["layers_tested"] == 14
    tested = [layer for layer in result["layers"] if layer["ks_pvalue"] is not None]
    assert {layer["name"].split(".")[-2] for layer in tested} == set(TARGET_SUFFIXES)
    assert result["reference"] is None  # a plain pretrained model records no seed
    for layer in tested:  # |W| holds a strong rank-1 part (its mean); sign(W) does not
        assert layer["rank_error"]["abs"][0] < 0.7
        assert layer["rank_error"]["sign"][0] > 0.95
    # but learned signs are more compressible than random ones at rank 32 (bench/results/analyze.md)
    mean = {kind: sum(layer["rank_error"][kind][1] for layer in tested) / len(tested) for kind in ("sign", "rademacher")}
    assert mean["sign"] < mean["rademacher"]


def test_analyze_cli_reports_a_bad_reference_in_one_line(folders, capsys):
    from hf_signlock.cli import main

    assert main(["analyze", str(folders / "run"), "--reference", "seed:6"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the loading progress bar
    assert error.startswith("hf-signlock: error: --reference (seed 6") and f"MODEL records seed {SEED}" in error
