"""Editing an export as a forger would: change its quantization_config, then seal it again (the config checksum and
the guard tensor that holds it recomputed), so the tests reach the checks behind the config checksum (the decoded
signs' checksums, the payload sizes). Without ``reseal`` the edit is what corruption or a careless hand does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_signlock.quantization.config import SignLockConfig
from hf_signlock.quantization.format.guard import GUARD_KEY
from hf_signlock.targets import find_target_modules


def edit_quantization_config(folder, edit, reseal: bool = True) -> None:
    """``edit(quantization_config_dict)`` in ``folder/config.json``; with ``reseal`` the checksum and guard follow."""
    path = Path(folder, "config.json")
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    if reseal:
        config["quantization_config"]["config_checksum"] = sealed_checksum(folder, config)
    path.write_text(json.dumps(config))
    if reseal:
        write_guard(folder, config["quantization_config"]["config_checksum"])


def sealed_checksum(folder, config: dict) -> str:
    """The config checksum ``config`` (a config.json dict) would have if export had written it."""
    signlock = SignLockConfig.from_dict(dict(config["quantization_config"], config_checksum=None))
    return signlock.decoding_checksum(target_shapes(folder, signlock))


def write_guard(folder, checksum: str) -> None:
    """Put ``checksum`` into the guard tensor of the weight file that holds it."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if GUARD_KEY not in handle.keys():  # noqa: SIM118
                continue
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata()
        tensors[GUARD_KEY] = torch.frombuffer(bytearray(bytes.fromhex(checksum)), dtype=torch.uint8).clone()
        save_file(tensors, str(file), metadata=metadata)


def target_shapes(folder, signlock: SignLockConfig) -> dict[str, tuple]:
    """``param_name -> shape`` of the export's target weights, in target order."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    targets = find_target_modules(model, signlock.target_modules, signlock.target_embeddings)
    return {f"{name}.weight": tuple(m.weight.shape) for name, m in targets.items()}


def edit_records(folder, edit, reseal: bool = True) -> None:
    """``edit(records)`` (``param_name -> record``) in the export's config; resealed unless asked not to."""
    def rewrite(q):
        signlock = SignLockConfig.from_dict(q)
        shapes = target_shapes(folder, signlock)
        records = signlock.layer_records(list(shapes))
        edit(records)
        signlock.set_layer_records(records, shapes)
        q.update(layers=signlock.layers, packed_layers=signlock.packed_layers)
    edit_quantization_config(folder, rewrite, reseal)


def weight_file(folder) -> Path:
    """The export's one weight file (the crafted cases use unsharded exports)."""
    (file,) = sorted(Path(folder).glob("*.safetensors"))
    return file


def edit_tensors(folder, edit) -> None:
    """``edit(tensors)`` (name -> tensor) of the export's weight file, written back with its metadata."""
    file = weight_file(folder)
    with safe_open(str(file), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    edit(tensors)
    save_file(tensors, str(file), metadata=metadata)


def edit_payload(folder, param_name: str, edit) -> None:
    """Rewrite one compressed layer's payload as a forger would: ``edit(sections) -> sections`` on its stored
    sections (name -> uint8 bytes), the payload rebuilt, its checksum and flip-stream length recorded, resealed."""
    from hf_signlock.quantization.format.payload import payload_digest

    signlock = SignLockConfig.from_dict(json.loads(Path(folder, "config.json").read_text())["quantization_config"])
    shapes = target_shapes(folder, signlock)
    record = signlock.layer_records(list(shapes))[param_name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    from hf_signlock.quantization.layers import compressed_like

    layer = compressed_like(model.get_submodule(param_name.removesuffix(".weight")), param_name, record, signlock)
    key = param_name  # format 7: the payload is stored under the dense weight's own name
    holder = {}
    edit_tensors(folder, lambda tensors: holder.update(payload=tensors[key]))
    payload = holder["payload"]
    sections = {name: payload[offset:offset + nbytes].clone() for name, (offset, nbytes, _, _) in layer.sections.items()}
    sections = edit(sections)
    order = sorted(layer.sections, key=lambda name: layer.sections[name][0])
    rebuilt = torch.cat([sections[name] for name in order])
    edit_tensors(folder, lambda tensors: tensors.update({key: rebuilt}))

    def update(records):
        records[param_name]["stored_checksum"] = payload_digest(rebuilt)
        if "flips" in sections:
            records[param_name]["flip_bytes"] = sections["flips"].numel()
    edit_records(folder, update)
