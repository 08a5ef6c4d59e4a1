"""The crafted checkpoints: each case copies one of a few real exports and damages it as corruption, a careless edit
or an attacker would; ``expect`` is the typed error (class name and message pattern) each way of reading it must
raise: ``dense`` and ``compressed`` loads with ``from_pretrained``, and ``inspect`` (``checkpoint_report``).

``None`` for a mode means it must succeed (the mode does not read what was damaged, e.g. ``inspect`` never reads
a base model)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from checkpoint_edits import (
    edit_payload,
    edit_quantization_config,
    edit_records,
    edit_tensors,
    weight_file,
)

from hf_signlock.quantization.format.guard import GUARD_KEY

MODES = ("dense", "compressed", "inspect")
FIRST = "model.layers.0.self_attn.q_proj.weight"
CORRUPT = ("CorruptCheckpointError", None)


@dataclass
class Case:
    """One crafted checkpoint: the export it starts from, the damage, and what each mode must raise."""

    source: str
    damage: Callable[[Path], None]
    expect: dict[str, tuple[str, str] | None]
    base: str | None = None  # a folder (under the sources root) passed as base_model when loading
    kind: str = "loads garbage"
    notes: str = ""


def everywhere(error: str, pattern: str) -> dict:
    return dict.fromkeys(MODES, (error, pattern))


def _config(**values):
    return lambda folder: edit_quantization_config(folder, lambda q: q.update(values), reseal=False)


def _sealed(**values):
    return lambda folder: edit_quantization_config(folder, lambda q: q.update(values))


def _record(param, **values):
    return lambda folder: edit_records(folder, lambda records: records[param].update(values))


def _record_params(param, reseal, **values):
    return lambda folder: edit_records(folder, lambda records: records[param]["codec_params"].update(values), reseal)


def _drop(*keys):
    return lambda folder: edit_tensors(folder, lambda tensors: [tensors.pop(key) for key in keys])


def _replace(key, make):
    return lambda folder: edit_tensors(folder, lambda tensors: tensors.update({key: make(tensors[key])}))


def _truncate(cut: int):
    def damage(folder):
        file = weight_file(folder)
        data = file.read_bytes()
        file.write_bytes(data[:-cut])
    return damage


def _three_byte_flip_stream(folder):
    edit_payload(folder, FIRST, lambda sections: {**sections, "flips": torch.tensor([0x81, 0x02, 0xFF],
                                                                                     dtype=torch.uint8)})


def _nan_table(folder):
    def edit(sections):
        scale = sections["row_scale"].clone()
        scale[:2] = torch.tensor([0xC0, 0x7F], dtype=torch.uint8)  # bf16 NaN (0x7FC0), little-endian
        return {**sections, "row_scale": scale}
    edit_payload(folder, FIRST, edit)


def _huge_table(folder):
    def edit(sections):
        scale = sections["row_scale"].clone()
        scale[:2] = torch.tensor([0x7F, 0x7F], dtype=torch.uint8)  # bf16 3.4e38: finite, overflows once decoded
        return {**sections, "row_scale": scale}
    edit_payload(folder, FIRST, edit)


def _missing_shard(folder):
    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    victim = max(set(index["weight_map"].values()))
    Path(folder, victim).unlink()


def _index_names(path_for):
    def damage(folder):  # the base's shard index names a file outside its folder
        index_file = Path(folder).parent / "base" / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = path_for(folder)
        index_file.write_text(json.dumps(index))
    return damage


def _base_inside(folder):
    shutil.copytree(Path(folder).parent / "base", Path(folder) / "base")
    edit_quantization_config(folder, lambda q: q.update(base_model="base"))


CASES: dict[str, Case] = {
    # --- loads garbage --------------------------------------------------------------------------------------------
    "codec-params-edited": Case("vq", _record_params(FIRST, False, bits=1, group=388),
                                everywhere("CorruptCheckpointError", "checksum differs")),
    "lm-head-deleted": Case("vq", _drop("lm_head.weight"),
                            {**everywhere("CorruptCheckpointError", "no `lm_head.weight`")}),
    "norm-deleted": Case("vq", _drop("model.norm.weight"), everywhere("CorruptCheckpointError", "no `model.norm.weight`")),
    "embedding-deleted": Case("vq", _drop("model.embed_tokens.weight"),
                              everywhere("CorruptCheckpointError", "no `model.embed_tokens.weight`")),
    "norm-reshaped": Case("vq", _replace("model.norm.weight", lambda t: t[:-1].clone()),
                          everywhere("CorruptCheckpointError", "model.norm.weight.*shape")),
    "norm-stored-as-integers": Case("vq", _replace("model.norm.weight", lambda t: t.to(torch.int32)),
                                    everywhere("CorruptCheckpointError", "model.norm.weight.*I32")),
    "guard-deleted": Case("vq", _drop(GUARD_KEY), everywhere("CorruptCheckpointError", "no guard tensor")),
    "guard-of-another-export": Case("vq", _replace(GUARD_KEY, torch.zeros_like),
                                    everywhere("CorruptCheckpointError", "guard does not hold")),
    "payload-from-another-layer": Case("vq", lambda folder: edit_tensors(folder, lambda t: t.update({
        FIRST: t["model.layers.0.self_attn.o_proj.weight"].clone()})),  # payloads, under the weights' names
        everywhere("CorruptCheckpointError", "q_proj.weight: the stored payload does not match")),
    "table-nan-forged": Case("vq", _nan_table, {"dense": ("CorruptCheckpointError", "NaN"),
                                                "compressed": ("CorruptCheckpointError", "NaN"), "inspect": None},
                             notes="payload checksum and config recomputed; inspect counts bytes, it decodes nothing"),
    "table-overflow-forged": Case("vq", _huge_table, {"dense": ("CorruptCheckpointError", "infinite"),
                                                      "compressed": ("CorruptCheckpointError", "infinite"),
                                                      "inspect": None},
                                  notes="finite tables that overflow once multiplied: the dense load checks the "
                                        "decoded weights, the compressed one the largest product of the tables"),
    # --- reports garbage ------------------------------------------------------------------------------------------
    "flip-bytes-2**62": Case("vq", _record(FIRST, flip_bytes=2 ** 62),
                             everywhere("CorruptCheckpointError", "flip stream"), kind="reports garbage"),
    "truncated-file": Case("vq", _truncate(100), everywhere("CorruptCheckpointError", "safetensors"),
                           kind="reports garbage"),
    "three-byte-flip-stream": Case("vq", _three_byte_flip_stream, everywhere("CorruptCheckpointError", FIRST),
                                   kind="reports garbage", notes="forged: payload checksum and config recomputed"),
    "records-not-base64": Case("vq", _sealed(layers="!!not base64!!"),
                               everywhere("CorruptCheckpointError", "not valid base64"), kind="reports garbage"),
    # --- hang / huge allocation -----------------------------------------------------------------------------------
    "backtracking-regex": Case("vq", _config(target_modules="(.*)*" + "x" * 30),
                               everywhere("SignLockConfigError", "repeats a repetition"), kind="hang / huge allocation"),
    "alternation-regex": Case("vq", _config(target_modules="(a|aa)*model.*"),
                              everywhere("SignLockConfigError", "repeats a group of alternatives"),
                              kind="hang / huge allocation"),
    "template-rank-10**7": Case("template", _config(template_rank=10 ** 7),
                                everywhere("SignLockConfigError", "template_rank"), kind="hang / huge allocation"),
    "template-rank-over-the-shape": Case("template", _sealed(template_rank=4000),
                                         {"dense": ("CorruptCheckpointError", "template_rank 4000 exceeds"),
                                          "compressed": ("CorruptCheckpointError", "template_rank 4000 exceeds"),
                                          "inspect": ("CorruptCheckpointError", "template_rank 4000 exceeds")},
                                         kind="hang / huge allocation"),
    "group-2**40": Case("vq", _record_params(FIRST, True, group=2 ** 40),
                        everywhere("CorruptCheckpointError", "payload for"), kind="hang / huge allocation"),
    "bits-2**62": Case("vq", _record_params(FIRST, True, bits=2 ** 62),
                       everywhere("CorruptCheckpointError", "impossible parameters"), kind="hang / huge allocation"),
    # --- reads files named in a file ------------------------------------------------------------------------------
    "base-model-absolute": Case("base", lambda folder: None,
                                {"dense": ("BaseModelNotFoundError", "outside the checkpoint's folder"),
                                 "compressed": ("BaseModelNotFoundError", "outside the checkpoint's folder"),
                                 "inspect": None}, kind="reads files named in a file",
                                notes="the export names its base by absolute path; loading is not given it"),
    "base-model-dotdot": Case("base", _sealed(base_model="../base"),
                              {"dense": ("BaseModelNotFoundError", "outside the checkpoint's folder"),
                               "compressed": ("BaseModelNotFoundError", "outside the checkpoint's folder"),
                               "inspect": None}, kind="reads files named in a file"),
    "base-index-absolute-path": Case("base", _index_names(lambda folder: "/etc/hostname"),
                                     {"dense": ("BaseModelNotFoundError", "not a file inside"),
                                      "compressed": ("BaseModelNotFoundError", "not a file inside"), "inspect": None},
                                     base="base", kind="reads files named in a file"),
    "base-index-dotdot-path": Case("base", _index_names(lambda folder: "../export-vq/model.safetensors"),
                                   {"dense": ("BaseModelNotFoundError", "not a file inside"),
                                    "compressed": ("BaseModelNotFoundError", "not a file inside"), "inspect": None},
                                   base="base", kind="reads files named in a file"),
    "base-model-relative-to-cwd": Case("base", _sealed(base_model="base-model-relative-to-cwd/base"),
                                       {"dense": ("BaseModelNotFoundError", "outside the checkpoint's folder"),
                                        "compressed": ("BaseModelNotFoundError", "outside the checkpoint's folder"),
                                        "inspect": None}, kind="reads files named in a file",
                                       notes="the worker runs in the cases' root, where this relative path exists"),
    "base-model-inside-the-export": Case("base", _base_inside, dict.fromkeys(MODES), kind="reads files named in a file",
                                         notes="control: a base inside the checkpoint's folder is followed"),
    # --- untyped crash --------------------------------------------------------------------------------------------
    "lowrank-rank-0": Case("lowrank", _record_params("model.layers.1.mlp.up_proj.weight", True, rank=0),
                           everywhere("CorruptCheckpointError", "up_proj.weight"), kind="untyped crash"),
    "missing-shard": Case("sharded", _missing_shard, everywhere("CorruptCheckpointError|ModelLoadError", "shard|safetensors"),
                          kind="untyped crash"),
}

# wrong JSON types and ranges in quantization_config: each a typed error naming the field, before any work
WRONG_TYPES = {
    "codec_params": [1], "target_modules": 5, "seed": "x", "bits_per_weight": "inf", "layers": 5,
    "packed_layers": "x", "dtype": "int8", "format_version": "6", "template_rank": 0, "sign_source": ["seed"],
    "codec": ["vq"], "target_embeddings": "yes", "dequantize": "no", "base_model": 5, "config_checksum": 7,
}
for _field, _value in WRONG_TYPES.items():
    _pattern = "pass a whole number|`seed`" if _field == "seed" else f"`{_field}`"
    CASES[f"wrong-type-{_field}"] = Case("vq", _config(**{_field: _value}),
                                         everywhere("SignLockConfigError|CorruptCheckpointError", _pattern),
                                         kind="untyped crash")
for _name, _params in {"bits-a": {"bits": "a"}, "bits-float": {"bits": 2.5}, "group-negative": {"group": -3},
                       "rank-huge": {"rank": 2 ** 40}}.items():
    CASES[f"codec-params-{_name}"] = Case("vq", _config(codec_params=_params),
                                          everywhere("SignLockConfigError", "codec parameter"), kind="untyped crash")


def build_case(name: str, sources: Path, root: Path) -> Path:
    """A fresh copy of the case's export (and of the base beside it, for base cases), damaged."""
    case = CASES[name]
    folder = root / name / f"export-{case.source}"
    shutil.copytree(sources / f"export-{case.source}", folder)
    if case.source == "base":
        shutil.copytree(sources / "base", root / name / "base")
    case.damage(folder)
    return folder
