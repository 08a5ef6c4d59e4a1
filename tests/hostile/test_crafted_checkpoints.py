"""Every crafted checkpoint of ``crafted.py`` is refused with its typed error, by every way of reading it, in bounded
time and memory. The cases are read in one subprocess under a 6 GiB address-space limit and a time limit, so an
unbounded allocation or a hang fails here instead of taking the machine."""

from __future__ import annotations

import copy
import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_edits import edit_tensors
from crafted import CASES, MODES, build_case
from test_quantizer import SEED, trained_model

from hf_signlock import SignLockConfig, apply_gap_init, quantize_model
from hf_signlock.quantization.format.guard import GUARD_KEY

MEMORY_LIMIT = 6 << 30
TIME_LIMIT = 420  # seconds for every case, every mode (about a minute on 2 cores)
PER_READ_LIMIT = 20  # seconds one read may take: a hang or a slow path shows here


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def write_sources(sources: Path) -> None:
    """The real exports the cases start from (a tiny seeded Llama with an untied head)."""
    model = trained_model("llama")
    exports = {"vq": SignLockConfig(seed=SEED, codec="vq", codec_params={"bits": 4, "group": 6}),
               "template": SignLockConfig(seed=SEED, sign_source="template", template_rank=4, codec="scale"),
               "lowrank": SignLockConfig(seed=SEED, codec="lowrank", codec_params={"rank": 2}),
               "sharded": SignLockConfig(seed=SEED, codec="exact")}
    template = trained_model("llama", moved=0.0)
    apply_gap_init(template, seed=SEED, gap=0.5, sign_source="template", template_rank=4)
    for name, config in exports.items():
        compressed = quantize_model(copy.deepcopy(template if name == "template" else model), config)
        compressed.save_pretrained(sources / f"export-{name}", **({"max_shard_size": "20KB"} if name == "sharded" else {}))
    model.save_pretrained(sources / "base", max_shard_size="20KB")  # a sharded dense base: its index is input too
    against = quantize_model(copy.deepcopy(model), SignLockConfig(sign_source="base", base_model=str(sources / "base"),
                                                                  codec="scale"))
    against.save_pretrained(sources / "export-base")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    write_sources(folder)
    return folder


@pytest.fixture(scope="module")
def results(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    for name in CASES:
        build_case(name, sources, root)
    output = root / "results.json"
    completed = subprocess.run([sys.executable, str(Path(__file__).parent / "worker.py"), str(root), str(output)],
                               preexec_fn=_limit_memory, timeout=TIME_LIMIT, capture_output=True, text=True, cwd=root,
                               check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_crafted_checkpoint_is_refused_with_its_typed_error(results, name):
    case, outcomes = CASES[name], results[name]
    for mode in MODES:
        outcome, expected = outcomes[mode], case.expect[mode]
        assert outcome["seconds"] < PER_READ_LIMIT, (mode, outcome)
        if expected is None:
            assert outcome["outcome"] == "ok", (mode, outcome)
            continue
        error, pattern = expected
        assert outcome["outcome"] == "error", (mode, "loaded", outcome)
        assert "SignLockError" in outcome["types"], (mode, outcome)  # typed: ours, one line at the CLI
        assert set(error.split("|")) & set(outcome["types"]), (mode, outcome)
        assert re.search(pattern, outcome["message"], re.DOTALL), (mode, pattern, outcome["message"])


def test_the_sources_themselves_load(sources):
    """The undamaged exports load (the cases fail for their damage, not for their source)."""
    from transformers import AutoModelForCausalLM

    for name in ("vq", "template", "lowrank", "sharded"):
        AutoModelForCausalLM.from_pretrained(sources / f"export-{name}")
    AutoModelForCausalLM.from_pretrained(sources / "export-base",
                                         quantization_config=SignLockConfig(base_model=str(sources / "base")))


@pytest.mark.parametrize("deleted", [(), (GUARD_KEY,), (GUARD_KEY, "model.norm.weight")])
def test_without_the_import_no_deletion_makes_it_load_as_a_plain_model(sources, tmp_path, deleted):
    """Without ``import hf_signlock``, transformers skips the unknown method: every target's payload, stored under
    the dense weight's own name, is then a size mismatch and it stops. Deleting the guard changes nothing; only
    deleting the payloads (the model itself) would, and then there is nothing left to load as garbage."""
    folder = tmp_path / "export"
    shutil.copytree(sources / "export-vq", folder)
    edit_tensors(folder, lambda tensors: [tensors.pop(key) for key in deleted])
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "assert 'hf_signlock' not in sys.modules\nprint('LOADED')")
    completed = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                               preexec_fn=_limit_memory, check=False)
    assert completed.returncode != 0 and "LOADED" not in completed.stdout
    assert "mismatch" in completed.stderr, completed.stderr[-2000:]  # transformers stops on the targets' shapes
