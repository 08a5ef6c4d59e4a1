"""Signs stored against a base model (``sign_source="base"``): the base's signs, their checks, and sign packs.

A fine-tune keeps almost every sign of the pretrained model it started from (sign lock-in), so its export stores
only the positions where its signs differ from its base's, coded like flips against a seed: about 0.01 bits per
weight instead of 1. The checkpoint's config names the base (``base_model``, ``base_revision``) and holds a checksum
of all the base's target signs (``base_signs_checksum``), verified before any layer decodes.

Where the base's signs are read (``base_model`` is a local folder, else a Hub id at ``base_revision``):

1. its sign pack, ``signlock_signs.safetensors`` (``save_sign_pack`` / ``hf-signlock signs``): one bit-packed uint8
   tensor per target weight, 1 bit per weight, and metadata (format version, target names, checksums, source
   model); nothing else is read or downloaded;
2. else its dense safetensors weights (``model.safetensors``, or the shards ``model.safetensors.index.json`` names),
   read tensor by tensor (target weights only, by name; the model is never built). A Hub base downloads only the
   shards that hold target weights.

What was read is kept in-process per (base_model, revision): loading every layer of a checkpoint, or exporting
several fine-tunes of one base, reads the base once. A base that cannot give the signs raises a typed
``BaseModelError``: not found (``BaseModelNotFoundError``), other target names or shapes (``BaseArchitectureError``),
other signs than the checkpoint's (``BaseSignsMismatchError``); nothing is decoded against it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open

from ..constants import QUANT_METHOD, SIGN_PACK_FORMAT_VERSION, SIGN_PACK_NAME
from ..errors import (
    BaseArchitectureError,
    BaseModelError,
    BaseModelNotFoundError,
    BaseSignsMismatchError,
    CorruptCheckpointError,
    SignLockConfigError,
)
from ..paths import inside, plain_relative_name, replaced_whole
from ..signs import pack_bits
from .format.records import targets_checksum

SIGN_PACK_FORMAT = "signlock-sign-pack"
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
_CACHE_SIZE = 2  # bases kept in memory (1 bit per target weight each); a third one evicts the oldest
_CACHE: OrderedDict[tuple, BaseSigns] = OrderedDict()
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def signs_checksum(bits: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> str:
    """Checksum of bit-packed signs (``pack_signs`` layout), in the given (target) order: each weight's name, shape
    and bits. 128-bit XXH3 (as the payload checksums, for speed): it stands for a whole model's signs."""
    digest = xxhash.xxh3_128(b"hf_signlock/base-signs/v2\x00")
    for name, packed in bits.items():
        digest.update(f"{name}|{','.join(map(str, shapes[name]))}|".encode())
        digest.update(packed.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weight_sign_bits(weight: torch.Tensor) -> torch.Tensor:
    """A weight's signs, bit-packed on the CPU (zero counts as +1, as export counts it; ``pack_signs`` layout)."""
    return pack_bits(weight.detach().cpu() >= 0)


class BaseSigns:
    """The signs of one base model's weights, read from one source (a sign pack or dense safetensors) on demand and
    kept once read.

    Args:
        description: where the signs come from, for messages.
        shape_of: name -> the stored weight's shape, or None when the source has no such weight.
        read: name -> the weight's signs, bit-packed (uint8 on the CPU).
        base_model, revision: the base as the config names it.
    """

    def __init__(self, description: str, shape_of: Callable[[str], tuple | None],
                 read: Callable[[str], torch.Tensor], base_model: str, revision: str | None):
        self.description = description
        self.base_model, self.revision = base_model, revision
        self._shape_of, self._read = shape_of, read
        self._bits: dict[str, torch.Tensor] = {}

    def bits(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The packed signs of weight ``name``, which must have ``shape`` (read once; do not modify them)."""
        if name not in self._bits:
            stored = self._shape_of(name)
            if stored is None:
                raise BaseArchitectureError(
                    f"the base model {self.description} has no weight {name!r}: it is another architecture than the "
                    f"checkpoint's. Set base_model to the model the fine-tune started from."
                )
            if tuple(stored) != tuple(shape):
                raise BaseArchitectureError(
                    f"the base model {self.description} stores {name!r} with shape {tuple(stored)}, the checkpoint "
                    f"needs {tuple(shape)}: the base is another architecture or size. Set base_model to the model the "
                    "fine-tune started from."
                )
            bits = self._read(name)
            numel = math.prod(shape)
            if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
                raise CorruptCheckpointError(f"the base model {self.description}: {name!r} holds {bits.numel()} "
                                             f"{bits.dtype} sign bytes, not {(numel + 7) // 8} uint8")
            self._bits[name] = bits
        return self._bits[name]

    def all_bits(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """The packed signs of every weight of ``shapes`` (name -> shape, in target order)."""
        return {name: self.bits(name, shape) for name, shape in shapes.items()}


# --- finding the base -----------------------------------------------------------------------------------------------

def clear_base_signs_cache() -> None:
    """Forget every base read so far (the next use reads it again)."""
    _CACHE.clear()


def resolve_base(base_model: str, revision: str | None = None) -> BaseSigns:
    """The signs of ``base_model`` at ``revision``, from its sign pack, else its dense weights (see the module
    docstring); nothing is read before it is asked for. Cached per (base_model, revision), and for a local folder
    per the state of its files, so a folder written again is read again."""
    base_model = str(base_model)
    path = Path(base_model).expanduser()
    local = path.is_dir()
    key = (base_model, None if local else revision, _fingerprint(path) if local else None)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    base = _local_base(path, base_model) if local else _hub_base(base_model, revision)
    _CACHE[key] = base
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return base


def base_named_by_checkpoint(base_model: str, checkpoint_dir: str | os.PathLike | None) -> str:
    """Where the ``base_model`` a checkpoint's own config names may be looked for: a Hub id, or a folder inside the
    checkpoint's folder (returned as its path). A config.json is input like any file: it does not get to make
    loading read an absolute path, a path out of its folder (``..``), or a folder of the working directory. The user
    who means such a folder names it: ``from_pretrained(path, quantization_config=SignLockConfig(base_model=...))``
    or ``--base_model`` on the command line."""
    name = str(base_model)
    fix = (f"the checkpoint's config names base_model {name!r}, a path outside the checkpoint's folder, which "
           "loading does not follow on a file's word. If that is the base the fine-tune was exported against, pass "
           "it yourself: from_pretrained(path, quantization_config=SignLockConfig(base_model=...)), or "
           "`--base_model` on the command line.")
    path = Path(name)
    if path.is_absolute() or name.startswith("~") or ".." in path.parts:
        raise BaseModelNotFoundError(fix)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / path).is_dir() and inside(checkpoint_dir, path):
        return str((Path(checkpoint_dir) / path).resolve())
    if _HUB_ID.fullmatch(name) and not name.startswith("."):
        if path.is_dir():  # would be read from the working directory instead of the Hub
            raise BaseModelNotFoundError(fix)
        return name
    raise BaseModelNotFoundError(fix)


def _fingerprint(folder: Path) -> tuple:
    files = [folder / name for name in (SIGN_PACK_NAME, INDEX_NAME, WEIGHTS_NAME)]
    return tuple((file.name, stat.st_mtime_ns, stat.st_size) for file in files if file.is_file()
                 for stat in [file.stat()])


def _local_base(folder: Path, base_model: str) -> BaseSigns:
    if (folder / SIGN_PACK_NAME).is_file():
        return _sign_pack(folder / SIGN_PACK_NAME, base_model, None)
    _refuse_signlock_checkpoint(folder / "config.json", base_model)
    if (folder / INDEX_NAME).is_file():
        return _dense(base_model, None, f"{base_model!r} (sharded safetensors)",
                      _weight_map(folder / INDEX_NAME, base_model), lambda file: folder / file)
    if (folder / WEIGHTS_NAME).is_file():
        return _dense(base_model, None, f"{base_model!r} (safetensors)", _single_file(folder / WEIGHTS_NAME),
                      lambda file: folder / file)
    raise BaseModelNotFoundError(
        f"the base model folder {base_model!r} holds neither a sign pack ({SIGN_PACK_NAME}) nor safetensors weights "
        f"({WEIGHTS_NAME} or {INDEX_NAME}). Point base_model at the pretrained model the fine-tune started from, or "
        "publish its signs with `hf-signlock signs BASE OUT` and point base_model at OUT."
    )


def _hub_base(base_model: str, revision: str | None) -> BaseSigns:
    if base_model.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(base_model):
        raise BaseModelNotFoundError(
            f"the base model {base_model!r} is not an existing folder (from {os.getcwd()}) nor a Hub id "
            "(owner/name). Pass the folder or Hub id of the model the fine-tune started from, or its sign pack, as "
            "base_model: from_pretrained(path, quantization_config=SignLockConfig(base_model=...))."
        )
    where = f"{base_model!r}" + (f" at revision {revision!r}" if revision else "")
    offline = []
    for filename in (SIGN_PACK_NAME, INDEX_NAME, WEIGHTS_NAME):
        file = _download(base_model, filename, revision, where, offline)
        if file is None:
            continue
        if filename == SIGN_PACK_NAME:
            return _sign_pack(file, base_model, revision)
        config = _download(base_model, "config.json", revision, where, [])
        if config is not None:
            _refuse_signlock_checkpoint(config, base_model)
        if filename == WEIGHTS_NAME:
            return _dense(base_model, revision, f"{where} (Hub, safetensors)", _single_file(file),
                          lambda _, file=file: file)
        return _dense(base_model, revision, f"{where} (Hub, sharded safetensors)", _weight_map(file, base_model),
                      lambda shard: _download(base_model, shard, revision, where, None))
    if offline:
        raise BaseModelNotFoundError(
            f"the base model {where} is not in the local Hub cache and the Hub cannot be reached ({offline[0]}). "
            "Connect (or unset HF_HUB_OFFLINE), or pass a local copy: from_pretrained(path, "
            "quantization_config=SignLockConfig(base_model='/path/to/base'))."
        )
    raise BaseModelNotFoundError(
        f"the Hub repo {where} has neither a sign pack ({SIGN_PACK_NAME}) nor safetensors weights. Point base_model "
        "at the pretrained model the fine-tune started from, or publish its signs with `hf-signlock signs BASE OUT`."
    )


def _download(repo: str, filename: str, revision: str | None, where: str, offline: list | None) -> Path | None:
    """A file of a Hub repo; None when the repo lacks it (or, given ``offline``, when it cannot be fetched: the
    reason is appended). Missing repos and revisions raise ``BaseModelNotFoundError``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except RepositoryNotFoundError:
        raise BaseModelNotFoundError(
            f"the base model {where} is not a local folder, and the Hub has no such repo (or it is private or gated: "
            "log in with `hf auth login`). Pass the folder or Hub id of the model the fine-tune started from, or of "
            "its sign pack, as base_model."
        ) from None
    except RevisionNotFoundError:
        raise BaseModelNotFoundError(f"the Hub repo {repo!r} has no revision {revision!r}: set base_revision to a "
                                     "branch, tag or commit it has (None: main).") from None
    except LocalEntryNotFoundError as error:  # offline or unreachable, and not cached
        if offline is None:
            raise BaseModelNotFoundError(f"the base model {where}: {filename} cannot be downloaded ({error})") from None
        offline.append(str(error).splitlines()[0])
        return None
    except EntryNotFoundError:
        if offline is None:
            raise BaseModelNotFoundError(f"the base model {where} has no {filename}, which its shard index names; the "
                                         "repo is incomplete") from None
        return None
    except (HfHubHTTPError, OSError) as error:
        raise BaseModelNotFoundError(f"the base model {where}: {filename} cannot be downloaded ({error})") from None


def _refuse_signlock_checkpoint(config_file: Path, base_model: str) -> None:
    if not config_file.is_file():
        return
    try:
        quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        raise BaseModelError(
            f"the base model {base_model!r} is a SignLock checkpoint: its signs are coded, not stored. Publish them as "
            f"a sign pack, `hf-signlock signs {base_model} OUT`, and set base_model to OUT."
        )


def _weight_map(index_file: Path, base_model: str) -> dict[str, str]:
    """The shard index's ``tensor -> file`` map; every file a plain name in the index's own folder (an index may be
    crafted: it does not get to name an absolute path or one out of its folder)."""
    try:
        weight_map = dict(json.loads(Path(index_file).read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise BaseModelNotFoundError(f"the base model {base_model!r}: {INDEX_NAME} is not a valid shard index "
                                     "(no weight_map)") from None
    for key, file in weight_map.items():
        if not (plain_relative_name(file) and isinstance(key, str)):
            raise BaseModelNotFoundError(f"the base model {base_model!r}: its {INDEX_NAME} names {file!r} for "
                                         f"{key!r}, which is not a file inside the model's folder; the index is "
                                         "corrupted or crafted")
    return weight_map


def _single_file(file: Path) -> dict[str, str]:
    with safe_open(str(file), "pt") as handle:
        return {key: file.name for key in handle.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)


def _dense(base_model: str, revision: str | None, description: str, weight_map: dict[str, str],
           fetch: Callable[[str], Path]) -> BaseSigns:
    """Signs read from dense safetensors: ``weight_map`` names the file of every stored tensor, ``fetch`` gives its
    path (a Hub shard is downloaded once, on first use). A target is looked up by its name, else by the one stored
    name that ends with it or that it ends with (checkpoints saved without the model's prefix, as GPT-2's original)."""
    fetch = functools.cache(fetch)

    def key_of(name: str) -> str | None:
        if name in weight_map:
            return name
        found = [key for key in weight_map if name.endswith("." + key) or key.endswith("." + name)]
        return found[0] if len(found) == 1 else None

    def shape_of(name: str):
        key = key_of(name)
        if key is None:
            return None
        with safe_open(str(fetch(weight_map[key])), "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def read(name: str) -> torch.Tensor:
        key = key_of(name)
        with safe_open(str(fetch(weight_map[key])), "pt") as handle:
            return weight_sign_bits(handle.get_tensor(key))

    return BaseSigns(description, shape_of, read, base_model, revision)


# --- sign packs -------------------------------------------------------------------------------------------------

def _sign_pack(file: Path, base_model: str, revision: str | None) -> BaseSigns:
    """The signs of a sign pack (read whole: it is 1 bit per weight), its format and metadata checked."""
    where = f"the sign pack of {base_model!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        with safe_open(str(file), "pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != SIGN_PACK_FORMAT:
                raise BaseModelError(f"{where}: {file.name} is not a SignLock sign pack (no format metadata); write "
                                     "one with `hf-signlock signs BASE OUT`")
            if meta.get("format_version") != str(SIGN_PACK_FORMAT_VERSION):
                raise BaseModelError(
                    f"{where} uses sign pack format version {meta.get('format_version')}; this hf_signlock reads "
                    f"version {SIGN_PACK_FORMAT_VERSION}. Upgrade hf_signlock, or write the pack again with this one."
                )
            bits = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        shapes = {name: tuple(shape) for name, shape in json.loads(meta["shapes"])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, BaseModelError):
            raise
        raise BaseModelError(f"{where}: {file} cannot be read ({error}); write it again with "
                             "`hf-signlock signs BASE OUT`") from None
    if set(shapes) != set(bits) or meta.get("targets_checksum") != targets_checksum(list(shapes)) \
            or meta.get("signs_checksum") != signs_checksum({name: bits[name] for name in shapes}, shapes):
        raise BaseModelError(f"{where} is corrupted (its tensors do not match the checksums in its metadata); "
                             "write it again with `hf-signlock signs BASE OUT`")
    description = f"{base_model!r}" + (f" at revision {revision!r}" if revision else "") + " (sign pack)"
    return BaseSigns(description, shapes.get, bits.__getitem__, base_model, revision)


def save_sign_pack(model_or_folder, out_dir: str | os.PathLike, *, revision: str | None = None,
                   target_modules: list[str] | str | None = None, target_embeddings: bool = True,
                   model_name: str | None = None) -> Path:
    """Write ``out_dir/signlock_signs.safetensors``: the signs of a base model's target weights, 1 bit each, for the
    fine-tunes exported against it (``sign_source="base"``) to name as ``base_model`` instead of the dense base.

    ``model_or_folder`` is a model in memory, or a local folder or Hub id (at ``revision``): dense safetensors are
    read tensor by tensor, a SignLock checkpoint is loaded compressed and its signs decoded. ``target_modules`` as
    ``SignLockConfig``'s (None: every projection inside the transformer blocks; a SignLock model's targets are its
    compressed layers), ``target_embeddings`` adds the token embedding and an untied LM head (as fine-tunes
    exported with ``target_embeddings`` need); the fine-tunes' targets must be among these. Returns the file's path; the folder can be
    uploaded as a Hub repo as is."""
    from ..targets import find_target_modules

    if isinstance(model_or_folder, torch.nn.Module):
        model, meta_only = model_or_folder, False
        source = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    else:
        source = model_name or str(model_or_folder)
        model, meta_only = _meta_or_compressed_model(str(model_or_folder), revision)
    # SignLockLinear layers, told by what they do (importing linear.py here would make an import cycle)
    compressed = {m.param_name: m for m in model.modules() if hasattr(m, "param_name") and hasattr(m, "verify")}
    if compressed:  # their stored signs, decoded and checked against their records
        if target_modules is not None:
            raise SignLockConfigError("a SignLock model's sign pack holds the signs of its compressed layers: leave "
                                      "`target_modules` unset")
        shapes = {name: tuple(layer.shape) for name, layer in compressed.items()}
        bits = {name: layer.verify().cpu() for name, layer in compressed.items()}
    else:
        targets = find_target_modules(model, target_modules, target_embeddings)
        shapes = {f"{name}.weight": tuple(module.weight.shape) for name, module in targets.items()}
        if meta_only:  # a dense folder or Hub id: the weights' signs are read from its files
            bits = resolve_base(str(model_or_folder), revision).all_bits(shapes)
        else:
            bits = {name: weight_sign_bits(module.weight) for name, module in zip(shapes, targets.values())}
    meta = {"format": SIGN_PACK_FORMAT, "format_version": str(SIGN_PACK_FORMAT_VERSION),
            "targets_checksum": targets_checksum(list(shapes)), "signs_checksum": signs_checksum(bits, shapes),
            "source_model": source, "source_revision": revision or "",
            "shapes": json.dumps([[name, list(shape)] for name, shape in shapes.items()], separators=(",", ":"))}
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with replaced_whole(out / SIGN_PACK_NAME) as partial:  # an interrupted write leaves the previous pack whole
        save_file({name: bits[name].contiguous() for name in shapes}, str(partial), metadata=meta)
    return out / SIGN_PACK_NAME


def _meta_or_compressed_model(source: str, revision: str | None):
    """The model of a folder or Hub id and whether it is on the meta device: a SignLock checkpoint is loaded
    compressed (its signs decode from it), any other built on the meta device from its config (its weights' signs
    are then read from its files)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import SignLockConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise BaseModelNotFoundError(f"{source!r} is not a model folder or Hub model ({error})") from None
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    if method == QUANT_METHOD:
        return AutoModelForCausalLM.from_pretrained(source, revision=revision,
                                                    quantization_config=SignLockConfig(dequantize=False)), False
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), True


# --- checks at export and load --------------------------------------------------------------------------------------

def check_base_signs(config, shapes: dict[str, tuple[int, ...]], exporting: bool = False) -> dict[str, torch.Tensor]:
    """Resolve the base of a ``sign_source="base"`` config and check it against the target weights ``shapes``
    (name -> shape, in target order): same names and shapes, and signs matching ``base_signs_checksum``. At export
    (``exporting``) an unset checksum is set from the base. Returns the base's packed signs, by name."""
    base = resolve_base(config.base_model, config.base_revision)
    bits = base.all_bits(shapes)
    checksum = signs_checksum(bits, shapes)
    if config.base_signs_checksum is None and exporting:
        config.base_signs_checksum = checksum
    elif config.base_signs_checksum is None:
        raise CorruptCheckpointError("this sign_source='base' checkpoint's config has no base_signs_checksum: it was "
                                     "not written by export. Export the fine-tune again.")
    elif checksum != config.base_signs_checksum:
        raise BaseSignsMismatchError(
            f"the signs of the base model {base.description} do not match the checksum the checkpoint was exported "
            f"against ({checksum} != {config.base_signs_checksum}): it is another model, another revision, or "
            "another copy of it. Point base_model (and base_revision) at the exact model the fine-tune was exported "
            "against."
        )
    return bits


def base_layer_bits(config, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base's packed signs of one target weight (CPU; shared, do not modify): read once per base."""
    return resolve_base(config.base_model, config.base_revision).bits(name, shape)
