"""Reference signs ``s0`` of a checkpoint's target weights, from wherever they can come from.

``resolve_reference(model_source, reference, model)`` reads the ``--reference`` argument of ``eval`` and ``analyze``:

- ``"seed:N"`` or an integer ``N``: the seeded signs of seed N (``hf_signlock.signs.reference_signs``, keyed by
  the parameter's name in ``model.named_parameters()``, as the trainer and export key them), with the sign source
  and template rank MODEL records (else ``"seed"``); ``"template:N"`` / ``"template:N:R"`` name the low-rank
  template source (rank R, default 8);
- a folder or Hub id of a dense checkpoint (an initial checkpoint, a base model): the signs of its weights, read
  from its safetensors files without building the model (a zero counts as +1, as a captured reference does);
- a folder or Hub id of a SignLock export: the signs it stores (its seed's signs with its coded flips applied, or
  its packed signs);
- nothing: what MODEL records. A run's ``signlock_stats.json`` (``reference_mode="seed"``: its seed, sign source
  and template rank; ``"captured"``: the bit-packed starting signs its checkpoints hold, else the starting model
  ``model_name_or_path`` when that is a local folder); an export's ``quantization_config`` (its seed: the export's
  signs against it are its coded flips; packed exports fall back on the training statistics they carry); a
  ``checkpoint-N`` folder's ``signlock_state.safetensors`` with the run's statistics beside it. A model that
  records nothing (a plain pretrained one) has no reference: None.

Bad input stops with a typed error that names the argument: a folder without weights, a reference of another
architecture or shape (``ModelLoadError``), and, when ``model`` is given, a reference the weights agree with only at
chance level (``SignLockConfigError``: about half the signs "flipped" means the weights were not trained from it;
the message names the seed MODEL records, if any).
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..constants import QUANT_METHOD, STATE_NAME, STATS_NAME, TRAINING_STATS_NAME
from ..errors import ModelLoadError, SignLockConfigError
from ..paths import WEIGHT_FILES, check_model_folder, inside
from ..signs import check_seed, reference_signs, unpack_signs
from .sign_metrics import flip_count, target_weights

ARGUMENT = "--reference"
RECORDED = "the reference MODEL records"
CHANCE_FLIP_RATE = 0.45  # above this the weights agree with the reference about as often as with coin flips
_CHANCE_SAMPLE_LAYERS = 8  # the chance check reads this many target layers, spread over the model
_SEED = re.compile(r"^(?:(seed|template):)?(-?\d+)(?::(\d+))?$")


class ReferenceSigns:
    """The reference signs of a model's target weights, keyed by parameter name.

    Args:
        description: what they are, for reports ("seed 0 recorded in runs/x/signlock_stats.json").
        lookup: ``(param_name, shape) -> tensor or None``; signs (or weights whose signs count) of that parameter.
        kind: "seed", "checkpoint", "export" or "captured".
        target_modules: the target-module patterns the signs were recorded for (None: the default targets).
        target_embeddings: whether the token embedding and LM head are among them (an export's ``target_embeddings``).
        skip_positions: positions, in target order, of layers without reference signs of this kind (an export's
            ``packed_layers``: their signs were stored packed, not against the seed).
        shape_of: ``param_name -> shape or None`` without reading values (None: any shape, as seeded signs).
        seed, sign_source, template_rank: the generator's settings, for seeded references.
        argument: how error messages name where the reference came from.
        recorded_seed: the seed MODEL records, if any (error messages name it).
    """

    def __init__(self, description: str, lookup: Callable[[str, tuple], torch.Tensor | None], *, kind: str,
                 target_modules: str | Sequence[str] | None = None, target_embeddings: bool = False,
                 skip_positions: Sequence[int] = (), shape_of: Callable[[str], tuple | None] | None = None,
                 seed: int | None = None, sign_source: str | None = None, template_rank: int | None = None,
                 argument: str = ARGUMENT, recorded_seed: int | None = None):
        self.description = description
        self.kind = kind
        self.target_modules = target_modules
        self.target_embeddings, self.skip_positions = target_embeddings, tuple(skip_positions)
        self.seed, self.sign_source, self.template_rank = seed, sign_source, template_rank
        self.argument = argument
        self.recorded_seed = recorded_seed
        self._lookup = lookup
        self._shape_of = shape_of

    def __repr__(self) -> str:
        return f"ReferenceSigns({self.description!r})"

    def signs(self, param_name: str, shape: Sequence[int]) -> torch.Tensor:
        """Reference signs (int8, +1/-1, on the CPU) of ``param_name``, which has ``shape`` in MODEL."""
        shape = tuple(int(n) for n in shape)
        self.check_shape(param_name, shape)
        found = self._lookup(param_name, shape)
        if found is None:
            raise self._missing(param_name)
        if tuple(found.shape) != shape:
            raise self._wrong_shape(param_name, tuple(found.shape), shape)
        if found.dtype == torch.int8:
            return found
        return torch.where(found >= 0, 1, -1).to(torch.int8)  # a zero weight counts as +1, as capture does

    def check_shape(self, param_name: str, shape: Sequence[int]) -> None:
        """Refuse (``ModelLoadError`` naming the argument) a parameter the reference lacks or holds at another shape;
        seeded references fit any."""
        if self._shape_of is None:
            return
        found = self._shape_of(param_name)
        if found is None:
            raise self._missing(param_name)
        if tuple(found) != tuple(shape):
            raise self._wrong_shape(param_name, tuple(found), tuple(shape))

    def _missing(self, name: str) -> ModelLoadError:
        return ModelLoadError(f"{self.argument} ({self.description}) holds no signs for {name!r}: it is a model of "
                              "another architecture, or other target modules. Pass the checkpoint MODEL was trained or "
                              "fine-tuned from.")

    def _wrong_shape(self, name: str, theirs: tuple, ours: tuple) -> ModelLoadError:
        return ModelLoadError(f"{self.argument} ({self.description}) holds {name!r} with shape {list(theirs)}, but MODEL "
                              f"has shape {list(ours)}: another architecture or size. Pass the checkpoint MODEL was "
                              "trained or fine-tuned from.")


# --- what a model folder records -----------------------------------------------------------------------------------


def _read_json(source: str, filename: str) -> dict | None:
    """``filename`` of a local folder or Hub repo as JSON; None when it is not there."""
    path = Path(source)
    if path.is_dir():
        file = path / filename
        return json.loads(file.read_text()) if file.is_file() else None
    if path.exists() or not _looks_like_hub_id(source):
        return None
    file = _hub_file(source, filename)
    return json.loads(file.read_text()) if file is not None else None


def _hub_file(repo: str, filename: str) -> Path | None:
    """An optional file of a Hub repo: from the local cache when it is there (or known to be absent), else fetched if
    the repo lists it. Offline (``HF_HUB_OFFLINE``) or unreachable: None, i.e. "not recorded"."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None or constants.HF_HUB_OFFLINE:  # cached as absent, or no network wanted
        return None
    if filename not in _hub_listing(repo):  # one listing per repo, not one failed download per file
        return None
    try:
        return Path(hf_hub_download(repo, filename))
    # an optional file: gone or unreachable both mean "not recorded". Connection errors are the HTTP client's own
    # classes, which change with huggingface_hub's client library: hence the broad except, here and below
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=16)
def _hub_listing(repo: str) -> frozenset[str]:
    from huggingface_hub import list_repo_files

    try:
        return frozenset(list_repo_files(repo))
    except Exception:  # noqa: BLE001 -- not found, private, offline: nothing can be read from it
        return frozenset()


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", source) is not None


def _module_patterns(stats: dict) -> list[str] | None:
    """A run's recorded targets (parameter names) as module names for ``find_target_modules``."""
    names = stats.get("target_modules")
    return [name.removesuffix(".weight") for name in names] if names else None


def signlock_quantization_config(model_source: str) -> dict | None:
    """The SignLock ``quantization_config`` of an export (from its config.json), else None."""
    config = _read_json(model_source, "config.json") or {}
    quantization = config.get("quantization_config") or {}
    return quantization if quantization.get("quant_method") == QUANT_METHOD else None


def training_statistics(model_source: str) -> tuple[dict, str] | tuple[None, None]:
    """The training statistics MODEL carries and where: a run's ``signlock_stats.json``, an export's
    ``training_signlock_stats.json``, or the run's beside a ``checkpoint-N`` folder; (None, None) if none."""
    for name in (STATS_NAME, TRAINING_STATS_NAME):
        stats = _read_json(model_source, name)
        if stats is not None:
            return stats, os.path.join(str(model_source), name)
    path = Path(model_source)
    if path.is_dir() and (path / STATE_NAME).is_file() and (path.parent / STATS_NAME).is_file():
        return json.loads((path.parent / STATS_NAME).read_text()), str(path.parent / STATS_NAME)
    return None, None


def _state_metadata(folder: Path) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(folder / STATE_NAME), "pt") as handle:
        return handle.metadata() or {}


def _captured_state_file(model_source: str) -> Path | None:
    """The newest ``signlock_state.safetensors`` of a captured run (its folder, or its ``checkpoint-N`` folders)."""
    path = Path(model_source)
    if not path.is_dir():
        return None
    if (path / STATE_NAME).is_file():
        return path / STATE_NAME
    steps = []
    for child in path.glob("checkpoint-*"):
        if (child / STATE_NAME).is_file() and child.name.split("-")[-1].isdigit():
            steps.append((int(child.name.split("-")[-1]), child / STATE_NAME))
    return max(steps)[1] if steps else None


# --- the sources ------------------------------------------------------------------------------------------------------


def _seeded(seed: int, sign_source: str, template_rank: int, description: str, *, target_modules=None,
            argument: str = ARGUMENT, recorded_seed: int | None = None, **targets) -> ReferenceSigns:
    check_seed(seed)
    if sign_source not in ("seed", "template"):
        raise SignLockConfigError(f"{argument}: sign source {sign_source!r} has no seeded signs; use 'seed' or "
                                  "'template'.")
    return ReferenceSigns(
        description, lambda name, shape: reference_signs(seed, name, shape, sign_source, template_rank),
        kind="seed", target_modules=target_modules, seed=seed, sign_source=sign_source, template_rank=template_rank,
        argument=argument, recorded_seed=recorded_seed, **targets)


class _TensorFiles:
    """Tensors of a checkpoint folder by name, read one at a time (safetensors, sharded or not; .bin as a fallback)."""

    def __init__(self, folder: Path, argument: str):
        self.folder, self.argument = folder, argument
        self._files: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        if (folder / "model.safetensors.index.json").is_file():
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            self._files = {key: folder / file for key, file in index["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), "pt") as handle:
                self._files = dict.fromkeys(handle.keys(), folder / "model.safetensors")
        else:
            files = sorted(folder.glob("pytorch_model*.bin"))
            if not files:
                raise ModelLoadError(f"{argument} {str(folder)!r} has no weights (none of {', '.join(WEIGHT_FILES)}).")
            self._bin = {}
            for file in files:  # mmap: only the tensors asked for are read
                self._bin.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        self._keys = set(self._files) if self._bin is None else set(self._bin)

    def key(self, name: str) -> str | None:
        """The stored key of parameter ``name``: as is, or without / with the base model's prefix (GPT-2 stores
        ``h.0.attn.c_attn.weight`` for ``transformer.h.0.attn.c_attn.weight``)."""
        if name in self._keys:
            return name
        stripped = name.split(".", 1)[-1]
        if stripped in self._keys:
            return stripped
        matches = [key for key in self._keys if name.endswith("." + key)]
        return matches[0] if len(matches) == 1 else None

    def shape(self, name: str) -> tuple | None:
        key = self.key(name)
        if key is None:
            return None
        if self._bin is not None:
            return tuple(self._bin[key].shape)
        from safetensors import safe_open

        with safe_open(str(self._files[key]), "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def get(self, name: str, shape=None) -> torch.Tensor | None:
        key = self.key(name)
        if key is None:
            return None
        if self._bin is not None:
            return self._bin[key]
        from safetensors import safe_open

        with safe_open(str(self._files[key]), "pt") as handle:
            return handle.get_tensor(key)


def _local_folder(source: str, argument: str) -> Path:
    """A local folder for ``source`` (a Hub id is downloaded: config and weights only)."""
    check_model_folder(source, argument)
    path = Path(source)
    if path.is_dir():
        return path
    if not _looks_like_hub_id(source):  # refused here, before any network call
        raise ModelLoadError(f"{argument} {source!r} is neither an existing folder nor a Hub id (owner/name).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "*.json"]))
    except Exception as error:  # noqa: BLE001 -- not found, gated, offline: one message naming the argument
        raise ModelLoadError(f"{argument} {source!r} is neither a local folder nor a reachable Hub model: {error}")


def _check_architecture(folder: Path, model, argument: str, source: str) -> None:
    if model is None or not hasattr(model, "config"):
        return
    theirs = json.loads((folder / "config.json").read_text()).get("model_type")
    ours = getattr(model.config, "model_type", None)
    if theirs and ours and theirs != ours:
        raise ModelLoadError(f"{argument} {source!r} is a {theirs!r} model but MODEL is a {ours!r} one: pass the "
                             "checkpoint MODEL was trained or fine-tuned from (same architecture and shapes).")


def _dense_checkpoint(folder: Path, source: str, argument: str) -> ReferenceSigns:
    files = _TensorFiles(folder, argument)
    return ReferenceSigns(f"signs of the dense checkpoint {source}", files.get, kind="checkpoint",
                          shape_of=files.shape, argument=argument)


def _export(folder: Path, source: str, argument: str) -> ReferenceSigns:
    """The signs a SignLock export stores (decoded from its coded flips or packed bits, checked against the
    checksums recorded at export)."""
    from ..quantization.config import SignLockConfig
    from ..quantization.layers import compressed_layers
    from .loading import load_causal_lm

    with warnings.catch_warnings():  # transformers notes that only the loading attribute `dequantize` is taken: meant
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config` attribute.*")
        model = load_causal_lm(str(folder), argument, quantization_config=SignLockConfig(dequantize=False))
    layers = {layer.param_name: layer for layer in compressed_layers(model).values()}
    config = model.config.quantization_config

    def lookup(name, shape):
        layer = layers.get(name)
        return None if layer is None else unpack_signs(layer.packed_signs().cpu(), layer.shape)

    how = ("packed signs" if config.sign_source == "packed" else f"base model {config.base_model} + coded flips"
           if config.sign_source == "base" else f"seed {config.seed} + coded flips")
    return ReferenceSigns(f"stored signs of the SignLock export {source} ({how})", lookup, kind="export",
                          target_modules=config.target_modules,
                          shape_of=lambda name: layers[name].shape if name in layers else None, argument=argument)


def _captured(state_file: Path, stats: dict | None, argument: str) -> ReferenceSigns:
    """The starting signs a captured run keeps bit-packed in its checkpoints (``reference.<name>``; the whole-tensor
    ``agree.<name>`` beside them gives each weight's shape)."""
    from safetensors import safe_open

    def lookup(name, shape):
        with safe_open(str(state_file), "pt") as handle:
            key = f"reference.{name}"
            return unpack_signs(handle.get_tensor(key), shape) if key in set(handle.keys()) else None

    def shape_of(name):
        with safe_open(str(state_file), "pt") as handle:
            key = f"agree.{name}"
            return tuple(handle.get_slice(key).get_shape()) if key in set(handle.keys()) else None

    return ReferenceSigns(f"captured starting signs in {state_file}", lookup, kind="captured",
                          target_modules=_module_patterns(stats) if stats else None, shape_of=shape_of,
                          argument=argument)


def _from_folder(source: str, argument: str, model=None) -> ReferenceSigns:
    """The signs of a checkpoint folder or Hub id: a SignLock export's stored signs, else its weights' signs."""
    folder = _local_folder(source, argument)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{argument} {source!r} has no config.json; pass a folder written by `save_pretrained`, "
                             "a Hub id, or seed:N.")
    _check_architecture(folder, model, argument, source)
    if signlock_quantization_config(str(folder)) is not None:
        return _export(folder, source, argument)
    return _dense_checkpoint(folder, source, argument)


def _recorded(model_source: str, argument: str) -> ReferenceSigns | None:
    """What MODEL records about its reference signs (see the module docstring); None if nothing."""
    quantization = signlock_quantization_config(model_source)
    if quantization and quantization.get("sign_source") in ("seed", "template"):
        seed = quantization["seed"]
        return _seeded(seed, quantization["sign_source"], quantization.get("template_rank", 8),
                       f"seed {seed} ({quantization['sign_source']} signs) recorded in the export's config.json: "
                       "its coded flips", target_modules=quantization.get("target_modules"), argument=argument,
                       recorded_seed=seed, target_embeddings=bool(quantization.get("target_embeddings")),
                       skip_positions=quantization.get("packed_layers") or ())
    stats, stats_file = training_statistics(model_source)
    path = Path(model_source)
    meta = _state_metadata(path) if path.is_dir() and (path / STATE_NAME).is_file() else None
    mode = (stats or {}).get("reference_mode") or (meta or {}).get("reference_mode")
    if mode == "seed":
        seed = int(stats["seed"]) if stats else int(meta["sign_seed"])
        sign_source = (stats or {}).get("sign_source", "seed")
        where = stats_file if stats else str(path / STATE_NAME)
        return _seeded(seed, sign_source, (stats or {}).get("template_rank", 8),
                       f"seed {seed} ({sign_source} signs) recorded in {where}",
                       target_modules=_module_patterns(stats) if stats else None, argument=argument,
                       recorded_seed=seed)
    if mode == "captured":
        state_file = _captured_state_file(model_source)
        if state_file is not None:
            return _captured(state_file, stats, argument)
        start = (stats or {}).get("model_name_or_path")
        if start and not Path(start).is_absolute() and (path / start).is_dir():
            start = str(path / start)  # a folder the stats name relative to themselves
        if start and Path(start).is_dir() and not inside(path, start):  # a file's word: not followed out of it
            raise SignLockConfigError(
                f"{model_source!r} records model_name_or_path {start!r} (in {stats_file}), a folder outside it, as the "
                f"model whose signs the run captured; a file does not get to make evaluation read other folders. "
                f"Pass {ARGUMENT} {start} (or another reference) yourself."
            )
        if start and Path(start).is_dir():  # the starting model's signs are the captured ones
            reference = _from_folder(start, argument)
            reference.description += " (the run's starting model, whose signs it captured)"
            reference.target_modules = _module_patterns(stats)
            return reference
        raise SignLockConfigError(
            f"{model_source!r} was trained with reference_mode='captured', but no checkpoint of it holds the captured "
            f"signs ({STATE_NAME}) and its starting model {start!r} is not a local folder: pass {ARGUMENT} with the "
            "model it was fine-tuned from."
        )
    return None


# --- the entry point --------------------------------------------------------------------------------------------------


def resolve_reference(model_source: str, reference: str | int | None, model=None) -> ReferenceSigns | None:
    """The reference signs for MODEL (``model_source``) from ``--reference`` (see the module docstring), or from
    what MODEL records when ``reference`` is None; None when nothing is recorded and none is given.

    With ``model`` (MODEL loaded), the reference is checked against it: every target parameter present at its
    shape, and the weights agreeing with it better than chance.
    """
    model_source = str(model_source)
    try:
        recorded = _recorded(model_source, RECORDED)
    except SignLockConfigError:  # a captured run whose signs were not kept: an error only if nothing is given
        if reference is None:
            raise
        recorded = None
    result = recorded if reference is None else _explicit(reference, model, recorded)
    if result is not None and model is not None:
        check_reference(model, result)
    return result


def _explicit(reference: str | int, model, recorded: ReferenceSigns | None) -> ReferenceSigns:
    text = str(reference).strip()
    seeded = None if isinstance(reference, bool) else _SEED.match(text)
    if seeded:
        kind, seed, rank = seeded.group(1), int(seeded.group(2)), seeded.group(3)
        if kind != "template" and rank:
            raise SignLockConfigError(f"{ARGUMENT} {text!r}: a rank goes with 'template:SEED:RANK' only.")
        # the sign source MODEL records applies to the seed it records; another seed gets plain seeded signs
        same = recorded is not None and recorded.seed == seed
        sign_source = kind or (recorded.sign_source if same else "seed")
        template_rank = int(rank) if rank else (recorded.template_rank if same else 8)
        result = _seeded(seed, sign_source, template_rank, f"seed {seed} ({sign_source} signs)")
    elif not text:
        raise SignLockConfigError(f"{ARGUMENT} is empty: pass seed:N, a checkpoint folder or a Hub id.")
    elif text.startswith(("seed:", "template:")):
        raise SignLockConfigError(f"{ARGUMENT} {text!r}: expected seed:N, template:N or template:N:RANK with integers.")
    else:
        result = _from_folder(text, ARGUMENT, model)
    if recorded is not None:
        result.recorded_seed = recorded.recorded_seed
        if result.target_modules is None:
            result.target_modules = recorded.target_modules
    return result


def evenly_spaced(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them if there are fewer), first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else items[:1]


@torch.no_grad()
def check_reference(model, reference: ReferenceSigns) -> None:
    """Refuse a reference that does not fit ``model``: a target missing or of another shape (``ModelLoadError``), or
    signs the weights agree with only at chance level over a sample of layers (``SignLockConfigError``)."""
    targets = target_weights(model, reference)
    for name, module in targets.items():
        reference.check_shape(name, tuple(module.weight.shape))
    flips = weights = 0
    for name in evenly_spaced(list(targets), _CHANCE_SAMPLE_LAYERS):
        weight = targets[name].weight
        flips += flip_count(weight, reference.signs(name, tuple(weight.shape)))
        weights += weight.numel()
    rate = flips / max(weights, 1)
    if rate <= CHANCE_FLIP_RATE:
        return
    found = (f"{reference.argument} ({reference.description}): {rate:.1%} of MODEL's target weights (a sample of "
             f"{weights:,}) disagree with its signs, about what random signs give: MODEL was not trained from them.")
    if reference.argument == RECORDED:
        hint = f"The recorded settings do not belong to these weights; pass {ARGUMENT} with what MODEL was trained from."
    elif reference.recorded_seed is not None:
        hint = f"MODEL records seed {reference.recorded_seed}: leave {ARGUMENT} out to use it."
    else:
        hint = f"MODEL records no seed; leave {ARGUMENT} out to skip the flip rate."
    raise SignLockConfigError(f"{found} {hint}")
