"""Recipes: YAML keys are dataclass fields, flags override them, bad input is a clear error."""

import dataclasses
from pathlib import Path

import pytest

from hf_signlock import DataError, RecipeError, SignLockConfigError
from hf_signlock.cli import main
from hf_signlock.training.recipe import parse_recipe

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize("name", ["quickstart", "baseline"])
def test_shipped_recipes_parse(name):
    model_args, data_args, training_args = parse_recipe(RECIPES / f"{name}.yaml")
    assert model_args.architecture == "llama"
    assert data_args.dataset_name == "shakespeare"
    assert training_args.output_dir == f"runs/{name}"


def test_quickstart_and_baseline_differ_only_in_the_method():
    def fields(path):
        return [{f.name: getattr(a, f.name) for f in dataclasses.fields(a)} for a in parse_recipe(path)]

    quick, base = fields(RECIPES / "quickstart.yaml"), fields(RECIPES / "baseline.yaml")
    differing = {k for q, b in zip(quick, base) for k in q if q[k] != b[k]}
    # logging_dir and run_name derive from output_dir
    assert differing - {"logging_dir", "run_name"} == {"gap", "drift_lambda", "output_dir"}
    assert quick[2]["drift_lambda"] > 0 and base[2]["drift_lambda"] == 0 and base[2]["gap"] == 0


def test_finetune_recipes_differ_only_in_the_drift():
    def fields(path):
        return [{f.name: getattr(a, f.name) for f in dataclasses.fields(a)} for a in parse_recipe(path)]

    drift, plain = fields(RECIPES / "finetune_smollm2.yaml"), fields(RECIPES / "finetune_smollm2_nodrift.yaml")
    differing = {k for d, p in zip(drift, plain) for k in d if d[k] != p[k]}
    assert differing - {"logging_dir", "run_name"} == {"drift_lambda", "output_dir"}
    model, data, training = drift
    # The documented folder of scripts/get_smollm2.py, with "~" expanded (from_pretrained would not).
    assert model["model_name_or_path"] == str(Path("~/.cache/hf_signlock/smollm2-135m").expanduser())
    assert data["dataset_name"] == "shakespeare" and data["data_files"] is None  # the built-in corpus
    assert training["reference_mode"] == "captured" and training["drift_lambda"] > 0 and plain[2]["drift_lambda"] == 0
    assert (training["output_dir"], plain[2]["output_dir"]) == ("runs/smollm2-ft", "runs/smollm2-ft-nodrift")


def test_quickstart_uses_the_recommended_defaults():
    from hf_signlock import SignLockTrainingArguments

    defaults = SignLockTrainingArguments(output_dir="x")
    _, _, quick = parse_recipe(RECIPES / "quickstart.yaml")
    for name in ("gap", "drift_lambda", "drift_margin", "reference_mode", "sign_source", "flip_tracking_steps"):
        assert getattr(quick, name) == getattr(defaults, name), name


def test_flags_override_the_recipe():
    _, data_args, training_args = parse_recipe(
        RECIPES / "quickstart.yaml", ["--max_steps", "7", "--gap", "0.5", "--block_size", "64"]
    )
    assert training_args.max_steps == 7 and training_args.gap == 0.5 and data_args.block_size == 64


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\ndrift_lamda: 3\nmax_steps: 2\n")
    with pytest.raises(RecipeError, match=r"'drift_lamda' \(did you mean 'drift_lambda'\?\)"):
        parse_recipe(recipe)


def test_unknown_flag_is_an_error():
    with pytest.raises(RecipeError, match="--not_a_field"):
        parse_recipe(RECIPES / "quickstart.yaml", ["--not_a_field", "1"])


def test_missing_recipe_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        parse_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        parse_recipe(tmp_path / "list.yaml")


def test_recipe_values_are_validated(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\nsign_seed: 1.5\n")
    with pytest.raises(SignLockConfigError, match="sign_seed"):
        parse_recipe(recipe)


def test_null_in_recipe_unsets_a_default(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\ndataset_name: null\ndata_files: [a.txt, b.txt]\n")
    _, data_args, _ = parse_recipe(recipe)
    assert data_args.dataset_name is None and data_args.data_files == ["a.txt", "b.txt"]


def test_cli_reports_a_missing_data_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\ndata_files: [{tmp_path / 'missing.txt'}]\nmax_steps: 1\n")
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "data_files" in err and "missing.txt" in err
    assert issubclass(DataError, Exception)
