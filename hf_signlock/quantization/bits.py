"""Bits of a SignLock checkpoint, counted from the files as written: every byte a target layer adds, and the rest.

A target layer adds to the checkpoint:

* ``sign_bits``: its coded flip stream (or its packed signs, for ``sign_source="packed"``);
* ``magnitude_bits``: its codec tables and codes, with its share of a codebook shared across layers;
* ``other_bits``: its bias; the entries of its tensors in the safetensors header; its record in ``config.json``
  (its base64 characters); and its share (pro rata by weights) of the SignLock overhead every export carries once:
  the rest of ``quantization_config``, and the guard tensor with its header entry.

``bpw`` is their sum over all target layers divided by the number of target weights. The report leads with the
whole checkpoint (``config.json``, ``generation_config.json``, weight files, shard index: what a user downloads for
the model): its bytes, its parameters (embeddings and head included, tied weights once) and its bits per
parameter, beside what a dense bf16 checkpoint of the same model takes. The parts add up to the files' sizes
exactly: the target layers by kind (block projections, token embedding and LM head), the tensors stored dense
(norms, biases of other modules, an embedding that is not a target), and the rest (header framing, the rest of the
config files).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
import xxhash

from ..constants import BPW_NAME, CHECKSUMMED_FORMAT
from ..errors import CorruptCheckpointError, SignLockError
from ..paths import plain_relative_name
from ..targets import find_target_modules, tied_head
from .codecs import make_codec
from .compressed import link_shared_tables
from .config import SignLockConfig
from .format.flip_coding import decode_flips
from .format.guard import GUARD_CHECKSUM_BYTES, GUARD_KEY, check_guards, guard_keys
from .layers import compressed_like, install
from .format.payload import payload_key
from .format.records import encoded_size
from .format.stored import StoredTensor, check_every_tensor, read_tensor

_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.float64: "F64"}
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_PART_NAMES = {"projection": "projections", "embedding": "token embedding", "head": "LM head"}
LAYER_FIELDS = ("weights", "flips", "sign_bits", "magnitude_bits", "other_bits", "total_bits")


def header_entry_bytes(key: str, dtype: str, shape, begin: int, end: int) -> int:
    """Bytes a tensor's entry takes in a safetensors header (compact JSON, with the comma that separates it)."""
    entry = json.dumps({key: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}},
                       separators=(",", ":"))
    return len(entry) - 1  # without the outer braces, plus one separating comma


def config_entry_bytes(name: str, value) -> int:
    """Bytes an entry adds to ``config.json`` as transformers writes it (``indent=2, sort_keys=True``)."""
    def size(d):
        return len(json.dumps(d, indent=2, sort_keys=True))
    return size({"_": 0, name: value}) - size({"_": 0})


def signlock_overhead_bytes(quantization_config: dict, offset_digits: int) -> float:
    """The bytes every SignLock export carries once, shared by its layers: ``quantization_config`` without its
    records, and the guard tensor (data and header entry)."""
    config_bytes = config_entry_bytes("quantization_config", quantization_config) - len(quantization_config["layers"])
    offset = 10 ** (offset_digits - 1)
    guard = GUARD_CHECKSUM_BYTES + header_entry_bytes(GUARD_KEY, "U8", [GUARD_CHECKSUM_BYTES], offset,
                                                      offset + GUARD_CHECKSUM_BYTES)
    return config_bytes + guard


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_safetensors_headers(folder: Path) -> tuple[dict[str, dict], int]:
    """Every tensor's header entry of the folder's weight files (with the file and where its data starts), and the
    files' total size. A file whose header does not parse, or whose tensors do not fill it exactly (truncated,
    padded, overlapping), is a ``CorruptCheckpointError`` naming it."""
    entries, total = {}, 0
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as handle:
                length = struct.unpack("<Q", handle.read(8))[0]
                if length > min(size - 8, MAX_HEADER_BYTES):
                    raise ValueError(f"a {length:,}-byte header in a {size:,}-byte file")
                header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            spans = sorted((tuple(entry["data_offsets"]), key) for key, entry in header.items())
            end = 0
            for (begin, stop), key in spans:
                if not (isinstance(begin, int) and isinstance(stop, int) and begin == end <= stop):
                    raise ValueError(f"`{key}` has data offsets {[begin, stop]} (gap, overlap or reversed)")
                entry = header[key]  # its data must be exactly its shape in its dtype, as safetensors requires
                if stop - begin != math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]]:
                    raise ValueError(f"`{key}` spans {stop - begin} bytes, not {entry['shape']} of {entry['dtype']}")
                end = stop
            if 8 + length + end != size:
                raise ValueError(f"its tensors end at byte {8 + length + end:,}, the file has {size:,}")
        except (struct.error, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as error:
            raise CorruptCheckpointError(f"{path} is not a valid safetensors file ({error}): truncated, or edited. "
                                         "Download or export it again.") from None
        for entry in header.values():
            entry["file"], entry["data_start"] = path, 8 + length + entry["data_offsets"][0]
        entries.update(header)
        total += size
    return entries, total


def _entry_bytes(key: str, entry: dict) -> int:
    return header_entry_bytes(key, entry["dtype"], entry["shape"], *entry["data_offsets"])


def _data_bytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


MAX_CONFIG_BYTES = 16 << 20  # a config.json with its layer records is kilobytes; a larger one is not ours


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict ({} when there is none); one that is too large, not JSON, or not an object
    is a ``CorruptCheckpointError`` naming it."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes")
        config = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path} cannot be read as a model config ({error}).") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} holds a JSON {type(config).__name__}, not a model config object.")
    return config


def _meta_model(folder: Path, config: dict):
    """The model of ``folder``, built on the meta device from its config (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as error:
        raise CorruptCheckpointError(f"{folder}/config.json does not describe a causal LM transformers can build "
                                     f"({type(error).__name__}: {str(error)[:200]})") from None


def checkpoint_report(folder: str | os.PathLike) -> dict:
    """Bits of every target layer of the SignLock checkpoint in ``folder`` and of the whole checkpoint."""
    folder = Path(folder)
    config = read_config(folder)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "signlock":
        raise SignLockError(f"{folder} is not a SignLock checkpoint (its config.json has no signlock "
                            "quantization_config): export one with `hf-signlock export RUN_DIR OUT_DIR`.")
    signlock = SignLockConfig.from_dict(qc)
    model = _meta_model(folder, config)
    targets = find_target_modules(model, signlock.target_modules, signlock.target_embeddings)
    embedding_kinds = _embedding_kinds(model) if signlock.target_embeddings else {}
    shapes = {f"{name}.weight": tuple(module.weight.shape) for name, module in targets.items()}
    records = signlock.layer_records(list(shapes))
    signlock.check_checksum(shapes)
    entries, weight_file_bytes = read_safetensors_headers(folder)
    codec = make_codec(signlock.codec, signlock.codec_params)
    record_chars = {name: encoded_size(record, codec) for name, record in records.items()}
    parameters = sum(p.numel() for p in model.parameters())  # the dense model's, before its targets are replaced
    compressed = {name: compressed_like(module, param_name, record, signlock)
                  for (name, module), (param_name, record) in zip(targets.items(), records.items())}
    _check_structure(folder, model, compressed, signlock, entries)
    guards = guard_keys(next(iter(records)), signlock.format_version)
    missing = [key for key in guards if key not in entries]
    if missing:
        raise CorruptCheckpointError(f"{folder}: the weight files have no guard tensor {missing[0]}; not a SignLock "
                                     "export, or an edited one")
    # quantization_config beside the records (and base64's padding), the guard tensors: shared by all layers
    shared = (config_entry_bytes("quantization_config", qc) - sum(record_chars.values())
              + sum(_data_bytes(entries[key]) + _entry_bytes(key, entries[key]) for key in guards))
    total_weights = sum(math.prod(module.weight.shape) for module in targets.values())

    layers, codebook_bytes, sharing = {}, 0, []
    for (module_name, module), (param_name, record) in zip(targets.items(), records.items()):
        layer = compressed[module_name]
        weights = math.prod(layer.shape)
        sections = {name: nbytes for name, (_, nbytes, _, _) in layer.sections.items()}
        sign_bytes = sections.pop("flips", 0) + sections.pop("sign_bits", 0)
        if record["codec_params"].get("codebook_owner"):
            codebook_bytes = sections.pop("codebook")
        if record["codec_params"].get("shared"):
            sharing.append(param_name)
        has_bias = getattr(module, "bias", None) is not None
        own_keys = [payload_key(module_name, signlock.format_version)] + ([f"{module_name}.bias"] if has_bias else [])
        missing = [key for key in own_keys if key not in entries]
        if missing:
            raise SignLockError(f"{folder}: the weight files have no {missing[0]} tensor")
        _check_payload(param_name, layer, record, entries[own_keys[0]])
        bias_bytes = _data_bytes(entries[own_keys[-1]]) if has_bias else 0
        other = (bias_bytes + sum(_entry_bytes(key, entries[key]) for key in own_keys)
                 + record_chars[param_name] + shared * weights / total_weights)
        layers[param_name] = {"kind": embedding_kinds.get(id(module), "projection"), "signs": layer.sign_source,
                              "weights": weights,
                              "flips": _stored_flips(layer, entries[own_keys[0]]),
                              "sign_bits": 8 * sign_bytes, "magnitude_bits": 8 * sum(sections.values()),
                              "other_bits": 8 * other, "codec_params": record["codec_params"]}
    sharing_weights = sum(layers[name]["weights"] for name in sharing)
    for name in sharing:  # the codebook its owner stores, charged to every layer that uses it
        layers[name]["magnitude_bits"] += 8 * codebook_bytes * layers[name]["weights"] / sharing_weights
    for layer in layers.values():
        layer["total_bits"] = layer["sign_bits"] + layer["magnitude_bits"] + layer["other_bits"]
        layer["bpw"] = layer["total_bits"] / layer["weights"]
    total = {field: sum(layer[field] or 0 for layer in layers.values()) for field in LAYER_FIELDS}
    target_bytes = total["total_bits"] / 8

    files = {name: (folder / name).stat().st_size for name in _MODEL_FILES if (folder / name).exists()}
    checkpoint_bytes = weight_file_bytes + sum(files.values())
    signlock_keys = set(guards) | {key for key in entries if key.rsplit(".", 1)[0] in targets}
    dense_bytes = sum(_data_bytes(entry) for key, entry in entries.items() if key not in signlock_keys)
    by_kind = {}
    for layer in layers.values():
        by_kind[layer["kind"]] = by_kind.get(layer["kind"], 0) + layer["total_bits"] / 8
    return {
        "checkpoint": {
            "bytes": checkpoint_bytes,
            "parameters": parameters,
            "bits_per_parameter": 8 * checkpoint_bytes / parameters,
            "dense_bf16_bytes": 2 * parameters,
            "files": {**files, "*.safetensors": weight_file_bytes},
            "target_bytes": target_bytes,
            "rest_bytes": checkpoint_bytes - target_bytes,  # dense tensors, header framing, the rest of the config
            "bytes_by_part": {**{_PART_NAMES[kind]: value for kind, value in by_kind.items()},
                              "dense tensors": dense_bytes,
                              "headers and config": checkpoint_bytes - target_bytes - dense_bytes},
        },
        "bpw": total["total_bits"] / total["weights"],
        "config_checksum": signlock.config_checksum,  # names this very checkpoint (its records hold its payloads')
        "sign_source": signlock.sign_source, "codec": signlock.codec, "codec_params": signlock.codec_params,
        "target_embeddings": signlock.target_embeddings,
        "total": total,
        "layers": layers,
    }


def _check_structure(folder: Path, model, layers: dict, signlock: SignLockConfig, entries: dict) -> None:
    """What loading checks before it reads a weight, checked here too (``entries``: the files' header entries):
    every tensor of the model stored at its shape (``layers``, the compressed ones, are put in its targets' place
    to say what that is), and the guards holding the config's checksum."""
    install(model, layers, signlock.target_embeddings and tied_head(model))
    link_shared_tables(layers.values())
    _check_shards(folder)
    stored = {key: StoredTensor(entry["shape"], entry["dtype"], str(entry["file"])) for key, entry in entries.items()}
    if signlock.format_version >= CHECKSUMMED_FORMAT:
        check_guards({key: (entry.shape, entry.dtype) for key, entry in stored.items()},
                     lambda: read_tensor(stored[GUARD_KEY], GUARD_KEY), next(iter(layers.values())).param_name,
                     signlock.config_checksum, signlock.format_version)
    check_every_tensor(model, stored, {f"{name}.payload": payload_key(name, signlock.format_version) for name in layers})


def _check_shards(folder: Path) -> None:
    """Every shard the index names is a file in the folder (a missing one would otherwise read as missing
    tensors)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        files = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CorruptCheckpointError(f"{index} is not a shard index (no weight_map object)") from None
    for name in sorted(files, key=str):
        if not (plain_relative_name(name) and (folder / name).is_file()):
            raise CorruptCheckpointError(f"{index} names the shard {name!r}, which is not a file in {folder}: a shard "
                                         "is missing (an interrupted download?) or the index was edited.")


def _embedding_kinds(model) -> dict[int, str]:
    """``id(module) -> "embedding" | "head"`` for the token embedding and the LM head."""
    kinds = {id(model.get_input_embeddings()): "embedding"}
    head = model.get_output_embeddings()
    if head is not None:
        kinds.setdefault(id(head), "head")
    return kinds


def _check_payload(param_name: str, layer, record: dict, entry: dict) -> None:
    """The stored payload has the size the record gives and the bytes export wrote (its checksum)."""
    size = sum(nbytes for _, nbytes, _, _ in layer.sections.values())
    if entry.get("dtype") != "U8" or entry.get("shape") != [size]:
        raise CorruptCheckpointError(f"{param_name}: the stored payload is {entry.get('dtype')} "
                                     f"{entry.get('shape')}, the layer record needs U8 [{size}]")
    with open(entry["file"], "rb") as handle:
        handle.seek(entry["data_start"])
        digest = xxhash.xxh3_64(f"payload|{size}|".encode())  # as payload_digest
        digest.update(handle.read(size))
    if digest.hexdigest() != record["stored_checksum"]:
        raise CorruptCheckpointError(f"{param_name}: the stored payload does not match the checksum recorded at "
                                     "export (corrupted or truncated file, or a tensor from another checkpoint)")


def _stored_flips(layer, payload_entry: dict) -> int | None:
    """The flip count of a stored layer: its flip stream read from the weight file and decoded whole (a count
    read from the header alone would report whatever a damaged stream claims)."""
    if "flips" not in layer.sections:
        return None
    offset, nbytes, _, _ = layer.sections["flips"]
    with open(payload_entry["file"], "rb") as handle:
        handle.seek(payload_entry["data_start"] + offset)
        stream = handle.read(nbytes)
    if not stream:
        return 0
    try:
        return len(decode_flips(stream, math.prod(layer.shape)))
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"{layer.param_name}: {error}") from None


def write_bits_report(folder: str | os.PathLike, extra: dict | None = None) -> dict:
    """Count the checkpoint in ``folder`` and write ``bpw.json`` beside it; returns the report."""
    report = {**checkpoint_report(folder), **(extra or {})}
    Path(folder, BPW_NAME).write_text(json.dumps(report, indent=2))
    return report
