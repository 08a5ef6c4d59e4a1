"""hf_signlock's points: ``hf-signlock export`` of the dense folder (``signmag`` codes, signs packed at 1 bit), at
3.25 and 4.25 bits per target weight, with and without refinement; and a fine-tune stored against its base.

Two scopes. By default the export compresses the token embedding (and so the tied head) at the same budget as the
projections: the whole download shrinks, and the embedding's rounding costs perplexity. The ``-proj`` points keep
the embedding in bf16 as the peers do (they quantize linear layers only), so that at equal bits per target weight
the same tensors are compressed on both sides.

Points: ``signmag-3.25``, ``signmag-4.25``, ``signmag-3.25-proj``, ``signmag-4.25-proj``,
``signmag-3.25-proj-refine`` (``--refine_steps 20 --refine_loss teacher``: 20 steps towards the dense model's
outputs on the calibration text), ``signmag-3.25-proj-refine-lm`` (20 steps of the language-model loss on the
calibration text: it also adapts the model to that text's domain, so it is no measure of compression alone),
``signmag-5.25`` (the whole model at the whole-file bits of llama.cpp's Q3_K_M), ``finetune-base`` (needs the
protocol's ``finetune``: a run fine-tuned from the model; its signs are stored as flips against it). Calibration is
the export's default, the driver's calibration windows: 64 x 256 tokens of the training text.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import file_fields, folder_bytes, log, measure_loaded, run_points

POINTS = {"signmag-3.25": {"bits_per_weight": 3.25}, "signmag-4.25": {"bits_per_weight": 4.25},
          "signmag-3.25-proj": {"bits_per_weight": 3.25, "target_embeddings": False},
          "signmag-4.25-proj": {"bits_per_weight": 4.25, "target_embeddings": False},
          "signmag-3.25-proj-refine": {"bits_per_weight": 3.25, "target_embeddings": False, "refine_steps": 20,
                                       "refine_loss": "teacher"},
          "signmag-3.25-proj-refine-lm": {"bits_per_weight": 3.25, "target_embeddings": False, "refine_steps": 20},
          "signmag-5.25": {"bits_per_weight": 5.25},
          "finetune-base": {"bits_per_weight": 2.3, "finetune": True}}


def describe(report: dict) -> str:
    """The export in a few words: codec, signs, code widths and groups of the projections, the embedding's scope."""
    projections = [layer for layer in report["layers"].values() if layer["kind"] == "projection"]
    shapes = sorted({(layer["codec_params"].get("bits"), layer["codec_params"].get("group")) for layer in projections},
                    key=str)
    codes = ", ".join(f"{bits}-bit codes / group {group}" for bits, group in shapes)
    embedding = "embedding compressed" if report.get("target_embeddings") else "embedding bf16"
    return f"{report['codec']}, signs {report['sign_source']}, {codes}; {embedding}"


def export_point(protocol: dict, out: Path, name: str) -> dict:
    from transformers import AutoModelForCausalLM

    import hf_signlock
    from hf_signlock.quantization.export import export_run

    settings = dict(POINTS[name])
    source = protocol["model"]
    kwargs = {"codec": "signmag", "sign_source": "packed"}
    if settings.pop("finetune", False):
        if not protocol.get("finetune"):
            raise FileNotFoundError("no fine-tune in the protocol (run.py --finetune FOLDER)")
        source, kwargs = protocol["finetune"], {"codec": "signmag", "base_model": protocol["model"]}
    folder = out / name
    log(f"hf_signlock {name}: export")
    start = time.perf_counter()
    report = export_run(source, folder, overwrite=True, **kwargs, **settings)
    quantize_s = time.perf_counter() - start
    loading = {}
    if "base_model" in kwargs:  # the bench names the base it exported against (loading never follows the config out)
        loading["quantization_config"] = hf_signlock.SignLockConfig(base_model=protocol["model"])
    fields = measure_loaded(lambda: AutoModelForCausalLM.from_pretrained(folder, **loading).eval(), protocol)
    # the projections' own bits (the embedding, when compressed, is not a target weight of the protocol)
    target_bits = sum(layer["total_bits"] for layer in report["layers"].values() if layer["kind"] == "projection")
    return {**fields, **file_fields(protocol, folder_bytes(folder), target_bits), "quantize_s": quantize_s,
            "detail": describe(report)}


if __name__ == "__main__":
    run_points("hf_signlock", POINTS, export_point)
