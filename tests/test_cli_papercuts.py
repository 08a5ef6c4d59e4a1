"""The first things a new user hits (issue 19): every ``--help`` works and shows defaults, ``--version``, train without
a recipe, push without a Hub, the model card of an export before pushing, loading compressed without a warning, the
figures of a run without flips, budget errors after the progress bar and naming the budget that fits, the docs'
held-out text and metric load, and ``eval`` that writes only when asked."""

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from perplexity_worker import corpus_text, tiny_model_folder
from test_quantizer import SEED, _run_folder, trained_model

from hf_signlock import BudgetError, RecipeError, SignLockConfig, SignLockError, quantize_model
from hf_signlock.cli import COMMANDS, main, make_parser, package_version
from hf_signlock.cli.options import escape_help, escape_parser_help, option
from hf_signlock.errors import HubUnreachableError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny trained run (seeded signs, some flipped) and its vq export (per-layer codec parameters)."""
    from hf_signlock.quantization.export import export_run

    root = tmp_path_factory.mktemp("papercuts")
    _, run = _run_folder(root)
    export = root / "export"
    export_run(run, export, codec="vq", bits_per_weight=3.0)
    return root, run, export


def _error_line(err: str) -> str:
    """The line of stderr holding the error, as a terminal shows it (what follows the last carriage return)."""
    lines = [line for line in err.split("\n") if "hf-signlock: error:" in line]
    assert len(lines) == 1, err
    return lines[0].split("\r")[-1]


# --- 1, 7: help texts, defaults, version --------------------------------------------------------------------------


def test_escape_help_doubles_bare_percent_signs_only():
    assert escape_help("6.4% perplexity (4.4% with a margin)") == "6.4%% perplexity (4.4%% with a margin)"
    assert escape_help("kept: %(default)s and 5%%") == "kept: %(default)s and 5%%"
    assert escape_help(escape_help("50% of it")) == "50%% of it"  # idempotent
    assert escape_help(None) is None
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--x", default=3, help="100% of %(default)s")
    sub = parser.add_subparsers().add_parser("cmd", help="a 5% command")
    sub.add_argument("--y", help="y in %")
    escape_parser_help(parser)
    assert "100% of 3" in parser.format_help() and "a 5% command" in parser.format_help()
    assert "y in %" in sub.format_help()


def test_option_helper_shows_defaults_and_escapes():
    parser = argparse.ArgumentParser(prog="p")
    option(parser, "batch_size", type=int, default=8, help="windows per pass, 50% of memory")
    option(parser, "split", default="train")
    option(parser, "window", type=int, default=None, help="tokens (default: the model's context)")
    option(parser, "flag", action="store_true", help="a switch")
    text = " ".join(parser.format_help().split())
    assert "windows per pass, 50% of memory (default: 8)" in text
    assert "default: train" in text
    assert text.count("default") == 3  # window's own wording kept, nothing added to it or to the switch


def test_train_help_prints_percent_signs(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "6.4% perplexity" in out and "--drift_margin" in out and "(default: 1.0)" in out


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"train"}))
def test_every_command_help_works_and_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hf-signlock" in out
    if command not in ("inspect", "push"):  # their flags are switches or unset by default
        assert "(default: " in out or "default: " in out


def test_help_defaults_are_the_parsers():
    parser = make_parser()
    args, _ = parser.parse_known_args(["export", "RUN", "OUT"])
    assert args.calibration_samples == 64 and args.refine_learning_rate == 3e-3
    help_text = " ".join(parser._subparsers._group_actions[0].choices["export"].format_help().split())
    assert "(default: 64)" in help_text and "(default: 0.003)" in help_text and "(default: lm)" in help_text


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"hf-signlock {version('hf-signlock')}" == f"hf-signlock {package_version()}"


# --- 2: train without a recipe; every train error points to --help ----------------------------------------------


def test_train_without_a_recipe_is_refused(capsys):
    from hf_signlock.cli.train import parse_train_arguments

    with pytest.raises(RecipeError, match=r"--config recipes/quickstart\.yaml.*hf-signlock train --help"):
        parse_train_arguments(None, ["--output_dir", "x"])
    assert main(["train", "--max_steps", "1"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--config recipes/quickstart.yaml" in line and "--help" in line
    # a fine-tune names its model instead: no recipe needed
    model_args, _, _ = parse_train_arguments(None, ["--model_name_or_path", "some/model", "--output_dir", "x"])
    assert model_args.model_name_or_path == "some/model"


@pytest.mark.parametrize("flags, message", [
    (["--gap", "-1"], "`gap` must be"),
    (["--max_steps", "x"], "invalid int value"),
    (["--not_a_field", "1"], "Unknown command-line arguments"),
])
def test_every_train_error_points_to_help(flags, message, capsys):
    assert main(["train", "--config", str(REPO / "recipes" / "quickstart.yaml"), *flags]) == 2
    line = _error_line(capsys.readouterr().err)
    assert message in line and "hf-signlock train --help" in line


def test_train_error_of_a_missing_recipe_points_to_help(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "does not exist" in line and "hf-signlock train --help" in line


# --- 3: push without a Hub ----------------------------------------------------------------------------------------


def test_push_offline_is_one_line(folders, tmp_path):
    _, _, export = folders
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_unused", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "hf_signlock", "push", str(export), "me/offline"], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("hf-signlock: error: cannot push to the Hub")
    assert "offline mode" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed once we return: a connection to it is refused


def test_push_to_a_refused_connection_is_typed(folders, monkeypatch, capsys):
    from huggingface_hub import constants

    _, _, export = folders
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_unused")
    before = sorted(p.name for p in export.iterdir())
    assert main(["push", str(export), "me/refused"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"cannot reach the Hugging Face Hub at {endpoint}" in line and "network" in line
    assert sorted(p.name for p in export.iterdir()) == before  # nothing written when the Hub is not reached


def test_hub_errors_are_mapped_only_when_the_hub_is_unreachable():
    import httpx2
    import requests
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from hf_signlock.hub import hub_unreachable

    for error in (OfflineModeIsEnabled("offline"), requests.ConnectionError("refused"), requests.Timeout("slow"),
                  httpx2.ConnectError("refused"), httpx2.ReadTimeout("slow"), ConnectionRefusedError(111, "refused")):
        mapped = hub_unreachable(error, "https://hub.example")
        assert isinstance(mapped, HubUnreachableError) and isinstance(mapped, (SignLockError, OSError)), error
        assert "https://hub.example" in str(mapped)
    try:
        try:
            raise httpx2.ConnectError("refused")
        except httpx2.ConnectError as cause:
            raise RuntimeError("wrapped") from cause
    except RuntimeError as wrapped:
        assert hub_unreachable(wrapped, "x") is not None  # found through the cause
    answered = httpx2.Response(401, request=httpx2.Request("GET", "https://hub.example/api/repos/create"))
    for error in (HfHubHTTPError("401 Unauthorized", response=answered), ValueError("bad repo id"), KeyError("x")):
        assert hub_unreachable(error, "https://hub.example") is None, error


# --- 4: the model card of an export, before and at push -----------------------------------------------------------


def test_write_model_card_writes_the_push_card_atomically(folders, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from hf_signlock.cards import export_card, write_model_card

    _, _, export = folders
    path = write_model_card(export)
    assert path == export / "README.md"
    card = ModelCard(path.read_text())
    assert {"hf-signlock", "sign-lock-in", "sub-bit"} <= set(card.data.tags)
    assert f'from_pretrained("{export}")' in card.text  # loads from where it is
    assert card.text == export_card(export, str(export)).text
    path = write_model_card(export, "me/repo", base_model="org/base", tags=["extra"])
    card = ModelCard(path.read_text())
    assert (card.data.base_model, card.data.base_model_relation) == ("org/base", "quantized")
    assert "extra" in card.data.tags and 'from_pretrained("me/repo")' in card.text
    assert [p.name for p in export.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    # a failed write leaves the previous card whole, and no temporary file
    previous = path.read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(export, "me/other")
    assert path.read_text() == previous
    assert [p.name for p in export.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    with pytest.raises(SignLockError, match="is not a SignLock export"):
        write_model_card(tmp_path)
    assert not (tmp_path / "README.md").exists()


def test_push_uploads_the_card_it_regenerates(folders, monkeypatch):
    from huggingface_hub import ModelCard

    from hf_signlock import hub

    _, _, export = folders
    uploaded = {}

    class FakeApi:
        endpoint = "https://hub.example"

        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Url", (), {"repo_id": f"me/{repo_id}"})()

        def create_branch(self, repo_id, branch, exist_ok=False):
            uploaded["branch"] = branch

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update(repo_id=repo_id, card=(Path(folder_path) / "README.md").read_text())
            return "https://hub.example/commit/1"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    assert hub.push_folder(export, "bare", base_model="org/base", tags=["t1"]) == "https://hub.example/commit/1"
    card = ModelCard(uploaded["card"])
    assert uploaded["repo_id"] == "me/bare" and 'from_pretrained("me/bare")' in card.text  # the full id
    assert card.data.base_model == "org/base" and "t1" in card.data.tags


# --- 5: loading compressed without transformers' warning --------------------------------------------------------


def test_loading_attributes_merge_without_a_warning(folders, caplog):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    from hf_signlock.quantization.linear import SignLockLinear

    _, _, export = folders
    stored = json.loads((export / "config.json").read_text())["quantization_config"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = AutoHfQuantizer.merge_quantization_configs(dict(stored), SignLockConfig(dequantize=False))
        model = AutoModelForCausalLM.from_pretrained(export, quantization_config=SignLockConfig(dequantize=False))
    assert isinstance(merged, SignLockConfig) and merged.dequantize is False and merged.layers == stored["layers"]
    assert any(isinstance(m, SignLockLinear) for m in model.modules())
    assert not [w for w in caught if "quantization_config" in str(w.message)], [str(w.message) for w in caught]
    # settings that cannot apply to a stored checkpoint are still named
    with caplog.at_level("WARNING"):
        merged = AutoHfQuantizer.merge_quantization_configs(dict(stored), SignLockConfig(codec="exact"))
    assert merged.codec == "vq" and "codec='exact'" in caplog.text and "ignored" in caplog.text


def test_other_quantization_methods_still_warn():
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    stored = BitsAndBytesConfig(load_in_4bit=True).to_dict()
    with pytest.warns(UserWarning, match="You passed `quantization_config`"):
        AutoHfQuantizer.merge_quantization_configs(stored, BitsAndBytesConfig(load_in_4bit=True))


# --- 6: figures ---------------------------------------------------------------------------------------------------


def test_flips_figure_of_a_run_without_flips_names_layers_and_says_so():
    from hf_signlock.evaluation.figures import flips_figure, require_matplotlib

    plt = require_matplotlib()
    names = [f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    layers = [{"name": n, "weights": 1024, "flip_rate": 0.0, "flips": 0, "near_zero_fraction": 0.01} for n in names]
    figure = flips_figure(plt, layers)
    try:
        figure.canvas.draw()
        top, bottom = figure.axes
        assert top.get_ylim() == (0, 1)  # not matplotlib's -0.04..0.04 around bars of 0
        assert any("no flips" in text.get_text() for text in top.texts)
        assert [label.get_text() for label in bottom.get_xticklabels()] == [
            "0.self_attn.q_proj", "0.mlp.down_proj", "1.self_attn.q_proj", "1.mlp.down_proj"]
        assert bottom.get_ylim()[0] == 0 and not bottom.texts
    finally:
        plt.close(figure)


def test_crossings_figure_has_integer_ticks_and_fits_only_where_there_is_data():
    from hf_signlock.evaluation.figures import crossings_figure, require_matplotlib

    plt = require_matplotlib()
    figure = crossings_figure(plt, {"crossing_histogram": [5000, 30, 0, 2, 0, 0, 0], "geometric_tail_ratio": 0.3})
    try:
        figure.canvas.draw()
        axis = figure.axes[0]
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert axis.get_xlim()[1] < 4  # the trailing empty bins are not drawn
        (fit,) = axis.get_lines()
        assert list(fit.get_xdata()) == [1, 2, 3]
        y = list(fit.get_ydata())
        assert math.isnan(y[1]) and not math.isnan(y[0]) and not math.isnan(y[2])  # no fit through the empty bin
        labels = [label.get_text() for label in axis.get_yticklabels() if label.get_text()]
        assert labels and all(re.fullmatch(r"[\d,]+", label) for label in labels)  # whole numbers of weights
    finally:
        plt.close(figure)
    figure = crossings_figure(plt, {"crossing_histogram": [5000, 0, 0], "geometric_tail_ratio": None})
    try:
        assert any("no weight crossed zero" in text.get_text() for text in figure.axes[0].texts)
    finally:
        plt.close(figure)


# --- 7: inspect shows each layer's codec parameters ----------------------------------------------------------------


def test_inspect_shows_each_layers_codec_parameters(folders, capsys):
    _, _, export = folders
    assert main(["inspect", str(export)]) == 0
    out = capsys.readouterr().out
    assert "codec parameters" in out
    rows = [line for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 14 and all(re.search(r"bits=\d+ group=\d+ row_scales=\w+", row) for row in rows)


# --- 8: budget errors ---------------------------------------------------------------------------------------------


def test_budget_error_prints_after_the_progress_bar(folders, tmp_path, capsys):
    _, run, _ = folders
    assert main(["export", str(run), str(tmp_path / "out"), "--codec", "vq", "--bits_per_weight", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "SignLock: signs and codes" in err  # the bar was drawn...
    assert _error_line(err).startswith("hf-signlock: error: codec 'vq'")  # ...and is gone when the error prints


def test_vq_budget_error_names_the_budget_that_fits():
    with pytest.raises(BudgetError, match=r"Raise the bits per weight \(bits_per_weight\) by at least \d") as error:
        quantize_model(trained_model("llama"), SignLockConfig(seed=SEED, codec="vq", bits_per_weight=1.0))
    shortfall = float(re.search(r"by at least (\d+\.\d+)", str(error.value)).group(1))
    assert "bits per weight" in str(error.value) and shortfall > 0
    # as typed: 1.0 + 1.081 is 2.0809999999999995 in floats, whose longer config.json costs a few more bits
    fits = round(1.0 + shortfall, 3)
    quantize_model(trained_model("llama"), SignLockConfig(seed=SEED, codec="vq", bits_per_weight=fits))
    with pytest.raises(BudgetError):  # the number is the smallest (to the 0.001 it prints, rounded up)
        quantize_model(trained_model("llama"), SignLockConfig(seed=SEED, codec="vq", bits_per_weight=fits - 0.002))


def test_vq_layer_budget_error_names_bits_per_weight():
    from hf_signlock.quantization.codecs import make_codec

    shape = (128, 352)
    with pytest.raises(BudgetError, match=r"cannot fit a 128x352 layer.*needs at least (\d+) bits \((\d\.\d+) a "
                                          r"weight.*Raise the bits per weight \(bits_per_weight\) by at least "
                                          r"0\.0\d\d") as error:
        make_codec("vq").choose(shape, 0.02 * math.prod(shape))
    least = int(re.search(r"at least (\d+) bits", str(error.value)).group(1))
    make_codec("vq").choose(shape, least)  # exactly that many bits fit
    with pytest.raises(BudgetError):
        make_codec("vq").choose(shape, least - 1)


# --- 9: the docs' held-out text and the flip-rate metric's load ----------------------------------------------------


def _code_block(text: str, after: str, language: str) -> str:
    start = text.index(after)
    block = text.index(f"```{language}\n", start) + len(f"```{language}\n")
    return text[block:text.index("```", block)]


def test_documented_heldout_command_writes_the_runs_validation_text(tmp_path):
    from hf_signlock.data import data_arguments_of, load_raw_datasets

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(50))
    run = tiny_model_folder(tmp_path / "run", data_files=[str(corpus)])
    command = _code_block((REPO / "docs" / "evaluation.md").read_text(), "## The held-out text as a file", "bash")
    assert "runs/quickstart-export" in command
    cwd = tmp_path / "work"
    cwd.mkdir()
    result = subprocess.run(["bash", "-c", command.replace("runs/quickstart-export", str(run)).replace(
        "python ", f"{sys.executable} ", 1)], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = load_raw_datasets(data_arguments_of(run))["validation"]["text"]
    assert (cwd / "heldout.txt").read_text() == "".join(rows) and corpus.read_text().endswith("".join(rows))
    task = (REPO / "recipes" / "lm_eval" / "signlock_text.yaml").read_text()
    assert "heldout.txt" in task  # the file the documented command writes is the one the lm-eval task reads


def test_flip_rate_readme_load_works_from_any_directory(tmp_path, monkeypatch):
    pytest.importorskip("evaluate")
    readme = (REPO / "hf_signlock" / "evaluation" / "metrics" / "flip_rate" / "README.md").read_text()
    code = _code_block(readme, "## How to load it", "python")
    monkeypatch.chdir(tmp_path)  # not the repository's root
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the documented code, as a user runs it)
    assert namespace["flip_rate"].compute(predictions=[0.5, -0.2], references=[1, 1])["flips"] == 1


# --- 10: eval writes only when asked ------------------------------------------------------------------------------


def test_eval_prints_and_writes_only_with_output(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(60))
    model = tiny_model_folder(tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    assert main(["eval", str(model), "--dataset", str(corpus), "--max_tokens", "200"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert sorted(p.name for p in model.iterdir()) == before  # no eval.json overwritten
    assert main(["eval", str(model), "--dataset", str(corpus), "--max_tokens", "200", "--output",
                 str(model / "eval.json")]) == 0
    assert json.loads((model / "eval.json").read_text())["tokens"] == 199
    assert "eval.json" in capsys.readouterr().out


def test_docs_and_makefile_ask_eval_to_write_eval_json():
    makefile = (REPO / "Makefile").read_text()
    assert "hf-signlock eval runs/quickstart-export --output runs/quickstart-export/eval.json" in makefile
    for doc in ("README.md", "docs/evaluation.md"):
        for line in (REPO / doc).read_text().splitlines():
            if line.startswith("hf-signlock eval") and "eval.json" in line:
                assert "--output" in line, (doc, line)
