"""FSDP2 row shards (2 processes, gloo on the CPU): the drift term, its gradient and the flip tracker on local shards
reproduce the single-process run exactly, with rows split unevenly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_fsdp2_shards_match_the_whole_model(tmp_path):
    out = tmp_path / "fsdp.json"
    worker = Path(__file__).parent / "fsdp_worker.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(worker),
         str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads(out.read_text())
    whole, sharded = record["whole"], record["sharded"]
    # The shards really are halves (33 + 32 rows of gate_proj), not whole copies.
    assert sharded["local_shapes"]["model.layers.0.mlp.gate_proj.weight"] == [33, 42]
    assert whole["local_shapes"]["model.layers.0.mlp.gate_proj.weight"] == [65, 42]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the embedding and head as targets, 49 + 48 rows
        assert sharded["local_shapes"][name] == [49, 42] and whole["local_shapes"][name] == [97, 42]
    assert sum(whole["flips"]) > 0  # weights did cross, so the counts are a real comparison
    assert sharded["flips"] == whole["flips"]
    assert sharded["near_zero"] == whole["near_zero"]
    assert sharded["histogram"] == whole["histogram"]
    assert sharded["state_shapes"] == whole["state_shapes"]  # gathered to whole tensors for the checkpoint
    assert sharded["state_checksum"] == whole["state_checksum"]
    # Equal up to the float order of the gradient reduce-scatter and of the summed shares of R.
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert sharded["drift"] == pytest.approx(whole["drift"], rel=1e-5)
    assert sharded["resumed_equal"] and whole["resumed_equal"]
