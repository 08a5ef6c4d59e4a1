"""The CLI as an attacker and as a careless user drive it, each command in a subprocess under a memory and a time
limit: nothing lost (an export never overwrites without being asked, an interrupted one leaves the old one whole),
bad arguments and crafted files give one typed line and exit code 2, quickly."""

from __future__ import annotations

import hashlib
import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_edits import edit_records
from test_quantizer import trained_model

MEMORY_LIMIT = 6 << 30
TIME_LIMIT = 120
CLI = "import sys; from hf_signlock.cli import main; sys.exit(main(sys.argv[1:]))"


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def cli(*args, code: str = CLI, timeout: int = TIME_LIMIT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit_memory, check=False)


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_typed_line(completed, pattern: str) -> None:
    assert completed.returncode == 2, completed.stderr[-2000:]
    lines = completed.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("hf-signlock: error: "), completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert pattern in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    trained_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture
def export(run, tmp_path):
    out = tmp_path / "export"
    assert cli("export", run, out, "--codec", "scale").returncode == 0
    (out / "eval.json").write_text(json.dumps({"perplexity": 1.0}))  # a result of this export
    return out


def test_export_into_the_run_itself_needs_overwrite(run):
    before = fingerprint(run)
    assert_one_typed_line(cli("export", run, run, "--codec", "scale"), "is the run folder itself")
    assert fingerprint(run) == before


def test_export_into_a_non_empty_folder_needs_overwrite_and_then_replaces_it_whole(run, export):
    before = fingerprint(export)
    assert_one_typed_line(cli("export", run, export, "--codec", "exact"), "is not empty")
    assert fingerprint(export) == before
    assert cli("export", run, export, "--codec", "exact", "--overwrite").returncode == 0
    assert not (export / "eval.json").exists()  # the previous export's result went with it
    assert json.loads((export / "config.json").read_text())["quantization_config"]["codec"] == "exact"
    assert [p.name for p in export.parent.iterdir()] == ["export"]  # no staging folder left beside it


def test_an_interrupted_export_leaves_the_old_one_whole(run, export):
    before = fingerprint(export)
    killed = ("import os, signal, sys\n"
              "import hf_signlock.quantization.export as export\n"
              "def die(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
              "export.write_bits_report = die\n"  # killed with the new export half written
              "from hf_signlock.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")
    completed = cli("export", run, export, "--codec", "exact", "--overwrite", code=killed)
    assert completed.returncode == -9
    assert fingerprint(export) == before
    leftovers = [p for p in export.parent.iterdir() if p.name != "export"]
    assert all(p.name.startswith(".export.") and p.name.endswith(".partial") for p in leftovers)  # hidden, never OUT


@pytest.mark.parametrize("args, pattern", [
    (["export", "/nonexistent/run", "{tmp}/out"], "RUN_DIR '/nonexistent/run' does not exist"),
    (["export", "{run}", "{tmp}/out", "--codec_params", '{"bits": "a"}'], "codec parameter `bits`"),
    (["export", "{run}", "{tmp}/out", "--bits_per_weight", "inf"], "`bits_per_weight` must be a finite number"),
    (["export", "{run}", "{tmp}/out", "--bits_per_parameter", "-1"], "`bits_per_parameter` must be a finite"),
    (["inspect", "{tmp}/nothing"], "not a SignLock checkpoint"),
], ids=["missing-run", "codec-params-type", "infinite-budget", "negative-budget", "inspect-nothing"])
def test_bad_arguments_are_one_typed_line(run, tmp_path, args, pattern):
    (tmp_path / "nothing").mkdir()
    completed = cli(*[a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in args], timeout=60)
    assert_one_typed_line(completed, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, pattern", [
    (lambda folder: edit_records(folder, lambda r: r["model.layers.0.self_attn.q_proj.weight"].update(
        flip_bytes=2 ** 62)), "flip stream"),
    (lambda folder: (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100]),
     "not a valid safetensors file"),
], ids=["flip-bytes-2**62", "truncated-file"])
def test_inspect_of_a_crafted_export_is_one_typed_line(export, damage, pattern):
    damage(export)
    assert_one_typed_line(cli("inspect", export, timeout=60), pattern)


def test_the_sign_pack_of_an_interrupted_write_keeps_the_old_one(run, tmp_path):
    assert cli("signs", run, tmp_path / "pack").returncode == 0
    before = fingerprint(tmp_path / "pack")
    killed = ("import os, signal, sys\n"
              "import hf_signlock.quantization.base_signs as base_signs\n"
              "def die(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
              "base_signs.os.replace = die\n"  # killed once the new pack is written, before it takes the place
              "from hf_signlock.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")
    assert cli("signs", run, tmp_path / "pack", code=killed).returncode == -9
    after = {name: digest for name, digest in fingerprint(tmp_path / "pack").items() if not name.startswith(".")}
    assert after == before
    shutil.rmtree(tmp_path / "pack")


@pytest.mark.parametrize("command", ["eval", "inspect"])
@pytest.mark.parametrize("config_text, pattern", [
    ("{not json", "cannot be"),
    (None, "cannot be loaded|not a SignLock checkpoint"),  # quantization_config a string, not an object
], ids=["not-json", "quantization-config-a-string"])
def test_a_malformed_config_is_one_typed_line(export, command, config_text, pattern):
    path = export / "config.json"
    if config_text is None:
        config = json.loads(path.read_text())
        config["quantization_config"] = "signlock"
        config_text = json.dumps(config)
    path.write_text(config_text)
    completed = cli(command, export, *(["--max_tokens", "50"] if command == "eval" else []), timeout=60)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert re.search(pattern, completed.stderr.strip().splitlines()[-1]), completed.stderr[-500:]
