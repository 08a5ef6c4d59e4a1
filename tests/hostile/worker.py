"""Reads every crafted checkpoint the way users do (``from_pretrained`` dense and compressed, ``inspect``'s
``checkpoint_report``) and writes what happened as JSON. Run in a subprocess under a memory limit and a time limit
(``test_crafted_checkpoints.py``): a case that allocates without bound or hangs fails the suite, not the machine.

    python worker.py CASES_ROOT RESULT_JSON
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from crafted import CASES
from transformers import AutoModelForCausalLM

import hf_signlock  # noqa: F401  (registers the quantizer)
from hf_signlock import SignLockConfig
from hf_signlock.quantization.bits import checkpoint_report

IDS = [[1, 2, 3, 4, 5, 6]]


def attempt(function) -> dict:
    started = time.perf_counter()
    try:
        function()
        outcome = {"outcome": "ok"}
    except Exception as error:  # noqa: BLE001 (what is recorded is the point)
        outcome = {"outcome": "error", "types": [cls.__name__ for cls in type(error).__mro__],
                   "message": str(error)[:2000], "where": traceback.format_exc(limit=-3)[-1500:]}
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


def load(folder: Path, base: Path | None, compressed: bool):
    import torch

    config = SignLockConfig(base_model=str(base) if base is not None else None, dequantize=not compressed)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    if not torch.isfinite(logits).all():
        raise AssertionError("loaded, and computes non-finite logits")


def main(root: str, output: str) -> None:
    root, results = Path(root), {}
    for name, case in CASES.items():
        folder = root / name / f"export-{case.source}"
        base = root / name / case.base if case.base else None
        results[name] = {"dense": attempt(lambda f=folder, b=base: load(f, b, False)),
                         "compressed": attempt(lambda f=folder, b=base: load(f, b, True)),
                         "inspect": attempt(lambda f=folder: checkpoint_report(f))}
        Path(output).write_text(json.dumps(results, indent=1))  # what finished survives a kill


if __name__ == "__main__":
    main(*sys.argv[1:])
