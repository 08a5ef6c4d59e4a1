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
from hf_signlock.quantization.guard import GUARD_KEY
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
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    targets = find_target_modules(model, signlock.target_modules, signlock.target_embeddings)
    return signlock.decoding_checksum({f"{name}.weight": tuple(m.weight.shape) for name, m in targets.items()})


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
