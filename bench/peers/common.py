"""What every peer script shares: the protocol file the driver writes, the measurements, the row it prints.

A peer script runs in its own Python environment (its tool may pin another transformers), so this module needs
only torch, transformers and ``hf_signlock`` importable from the repository (the driver puts the repository on
``PYTHONPATH``): perplexity is ``hf_signlock``'s own sliding-window evaluation in every environment, on the token ids
the driver wrote, never re-tokenised.

The protocol (``protocol.json``, written once by ``run.py``): ``model`` (the dense HF folder), ``eval_ids`` (the
held-out tokens), ``calibration`` (windows of token ids from the training text, never the held-out text),
``window`` / ``stride`` of the perplexity, ``parameters`` (of the dense model: the denominator of every file's bits
per parameter), ``target_weights`` (weights of the target projections) and ``threads``.

    python bench/peers/peer_<tool>.py PROTOCOL OUT_DIR [POINT ...]   # prints one JSON list of rows, last line
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # memory.py
from memory import rss_mib

TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_TOKENS, NEW_TOKENS = 32, 64


def log(message: str) -> None:
    """Progress on stderr (stdout carries the rows)."""
    print(message, file=sys.stderr, flush=True)


def read_protocol(path: str | Path) -> dict:
    """The driver's protocol file."""
    return json.loads(Path(path).read_text())


def row(tool: str, method: str, **fields) -> dict:
    """One point of the table; ``perplexity`` None with an ``error`` where it failed."""
    return {"tool": tool, "method": method, "target_bpw": None, "file_bytes": None, "file_bits_per_parameter": None,
            "perplexity": None, "tokens_per_s": None, "quantize_s": None, "load_s": None, "resident_mib": None,
            **fields}


def emit(rows: list[dict]) -> None:
    """The rows as the last line of stdout, for the driver."""
    print(json.dumps(rows), flush=True)


def folder_bytes(folder: str | Path) -> int:
    """Every byte a user downloads of a model folder: weights, configs, tokenizer (each tool writes its own)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def file_fields(protocol: dict, file_bytes: int, target_bits: float | None) -> dict:
    """Whole-file bits per parameter, and bits per target weight from the target layers' stored bits."""
    return {"file_bytes": file_bytes, "file_bits_per_parameter": 8 * file_bytes / protocol["parameters"],
            "target_bpw": None if target_bits is None else target_bits / protocol["target_weights"]}


def is_target(name: str) -> bool:
    """Whether a module (or tensor) name belongs to a target projection (``...layers.N.self_attn.q_proj...``)."""
    parts = name.split(".")
    return any(part in TARGET_SUFFIXES for part in parts)


def perplexity(model, protocol: dict) -> float:
    """hf_signlock's sliding-window perplexity on the protocol's held-out ids."""
    import torch

    from hf_signlock.evaluation.perplexity import sliding_window_perplexity

    with torch.no_grad():
        return sliding_window_perplexity(model, torch.tensor(protocol["eval_ids"]), window=protocol["window"],
                                         stride=protocol["stride"])["perplexity"]


def generation_tokens_per_s(model, repeats: int = 3) -> float:
    """Greedy generation at batch 1 (a 32-token prompt, 64 new tokens): the median of ``repeats`` runs, after one
    warm-up."""
    import torch

    prompt = torch.randint(100, 10_000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    settings = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
                "pad_token_id": model.config.eos_token_id}
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    speeds = []
    with torch.inference_mode():
        model.generate(prompt, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompt, **settings)
            speeds.append(NEW_TOKENS / (time.perf_counter() - start))
    return statistics.median(speeds)


def measure_loaded(load, protocol: dict, *, speed: bool = True) -> dict:
    """Load a model with ``load()`` and measure it: load seconds, resident memory the load added, perplexity,
    generation speed."""
    import torch

    torch.set_num_threads(protocol["threads"])
    before = rss_mib()
    start = time.perf_counter()
    model = load()
    fields = {"load_s": time.perf_counter() - start}
    after = rss_mib()
    fields["resident_mib"] = None if before is None or after is None else after - before
    fields["perplexity"] = perplexity(model, protocol)
    if speed:
        fields["tokens_per_s"] = generation_tokens_per_s(model)
    return fields


def guarded(tool: str, method: str, work) -> dict:
    """``work()``'s row fields, or the row with the error that stopped it (the other points still run)."""
    try:
        return row(tool, method, **work())
    except Exception as error:  # noqa: BLE001 (a peer that fails is a row of the table, not the end of the run)
        log(f"{tool} {method}: {type(error).__name__}: {error}")
        return row(tool, method, error=f"{type(error).__name__}: {error}"[:500])


def saved_target_bits(folder: str | Path, skip: tuple[str, ...] = ()) -> int:
    """Bits of every tensor saved in ``folder``'s safetensors that belongs to a target projection (names ending in
    ``skip`` left out: bookkeeping a tool stores beside the weights)."""
    from safetensors import safe_open

    bits = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(path, "pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if is_target(key) and not key.endswith(skip or ("\0",)):
                    tensor = tensors.get_tensor(key)
                    bits += 8 * tensor.numel() * tensor.element_size()
    return bits


def run_points(tool: str, points, measure) -> None:
    """A peer script's main: ``PROTOCOL OUT_DIR [POINT ...]`` from the command line (no points: all of
    ``points``), ``measure(protocol, out, point)`` for each, the rows printed for the driver."""
    protocol, out = read_protocol(sys.argv[1]), Path(sys.argv[2])
    chosen = sys.argv[3:] or list(points)
    emit([guarded(tool, name, lambda name=name: measure(protocol, out, name)) for name in chosen])
