"""``bench/peers/run.py --merge``: rerunning one tool or point keeps the other rows, and only under the same protocol."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# loaded by path under its own name: the driver is a script, not a package module
_SPEC = importlib.util.spec_from_file_location("peers_run", Path(__file__).resolve().parents[1] / "bench" / "peers"
                                               / "run.py")
peers_run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peers_run)

PROTOCOL = {"model": "/m", "eval_ids": [1, 2, 3], "calibration": [[4, 5]], "window": 256, "stride": 128, "threads": 2}


def write_results(path: Path, protocol: dict, rows: list[dict]) -> None:
    meta = {"protocol_checksum": peers_run.protocol_checksum(protocol), "runs": [{"peers": ["a"], "points": "",
                                                                                 "seconds": 10.0}]}
    path.write_text(json.dumps({"rows": rows, "meta": meta}))


def test_merge_replaces_the_rows_measured_again_and_keeps_the_rest(tmp_path):
    path = tmp_path / "peers.json"
    write_results(path, PROTOCOL, [{"tool": "a", "method": "x", "perplexity": 1.0},
                                   {"tool": "b", "method": "y", "perplexity": 2.0}])
    rows, runs = peers_run.merged(path, PROTOCOL, [{"tool": "a", "method": "x", "perplexity": 3.0},
                                                   {"tool": "a", "method": "z", "perplexity": 4.0}],
                                  [{"peers": ["a"], "points": "a:x,a:z", "seconds": 5.0}])
    assert [(r["tool"], r["method"], r["perplexity"]) for r in rows] == [("a", "x", 3.0), ("a", "z", 4.0),
                                                                          ("b", "y", 2.0)]
    assert [run["seconds"] for run in runs] == [10.0, 5.0]
    assert "Runs merged" in peers_run.runs_text({"runs": runs, "seconds": 15.0})


def test_merge_refuses_results_of_another_protocol(tmp_path):
    path = tmp_path / "peers.json"
    write_results(path, {**PROTOCOL, "eval_ids": [9]}, [{"tool": "a", "method": "x", "perplexity": 1.0}])
    with pytest.raises(SystemExit, match="another protocol"):
        peers_run.merged(path, PROTOCOL, [], [])


def test_merge_without_earlier_results_is_this_run(tmp_path):
    rows = [{"tool": "a", "method": "x"}]
    assert peers_run.merged(tmp_path / "none.json", PROTOCOL, rows, []) == (rows, [])


def test_equal_bits_lists_the_peers_within_a_tenth_and_says_whether_we_are_lower():
    rows = [{"tool": "hf_signlock", "method": "a", "target_bpw": 3.25, "file_bits_per_parameter": 3.5, "perplexity": 30.0},
            {"tool": "x", "method": "near", "target_bpw": 3.3, "file_bits_per_parameter": 6.0, "perplexity": 40.0},
            {"tool": "y", "method": "far", "target_bpw": 3.5, "file_bits_per_parameter": 3.55, "perplexity": 20.0},
            {"tool": "dense", "method": "bf16", "target_bpw": 3.25, "file_bits_per_parameter": 3.5, "perplexity": 1.0}]
    lines = peers_run.equal_bits(rows)
    per_target, per_file = (line for line in lines if line.startswith("| a |"))
    assert "x near (3.300): 40.00" in per_target and "far" not in per_target and per_target.endswith("| yes |")
    assert "y far (3.550): 20.00" in per_file and per_file.endswith("| no |")
