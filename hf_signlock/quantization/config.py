"""``SignLockConfig``: the ``quantization_config`` of a sub-bit checkpoint whose signs come from a seed.

Registered with transformers as quant_method ``signlock`` (``registration.py``): ``config.json`` carries it, and ``from_pretrained``
rebuilds the model from it once ``hf_signlock`` is imported. Passed to ``from_pretrained`` of a dense model, it
compresses the model while loading. Besides the user's choices, an exported config holds one compact record per
target layer (``layers``: what loading checks, see ``records.py``) and a checksum of the target names.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..constants import EXPORT_FORMAT_VERSION, QUANT_METHOD, READABLE_EXPORT_FORMATS
from ..errors import CorruptCheckpointError, SignLockConfigError
from ..signs import check_seed
from .codecs import CODECS, DEFAULT_CODEC, make_codec
from .records import decode_records, encode_records, targets_checksum

SIGN_SOURCES = ("seed", "template", "packed", "base")
DEFAULT_BITS_PER_WEIGHT = 1.0  # the budget of codecs that fit one, when none is given (CLI and Python alike)


class SignLockConfig(QuantizationConfigMixin):
    """How a SignLock checkpoint stores its target layers.

    Args:
        seed: the sign seed the model was initialised with (``sign_source`` "seed" or "template").
        sign_source: "seed" (signs regenerated from the seed, flips stored), "template" (low-rank seeded template,
            flips stored), "packed" (explicit 1-bit signs: for models not trained from our seeded init) or "base"
            (flips stored against the signs of ``base_model``: for fine-tunes of a pretrained model).
        base_model: with ``sign_source="base"``: the model the signs are stored against, a local folder or a Hub id,
            holding a sign pack (``hf-signlock signs``) or dense safetensors weights. Also a loading attribute:
            ``from_pretrained(repo, quantization_config=SignLockConfig(base_model="/local/copy"))`` looks for the
            base elsewhere (with ``base_revision``); its signs must still match ``base_signs_checksum``.
        base_revision: the base's Hub revision (branch, tag or commit); None: main (or a local folder).
        template_rank: rank of the template (``sign_source="template"``).
        target_modules: patterns of the modules to compress (None: every Linear/Conv1D inside the repeated blocks).
        target_embeddings: also compress the token embedding (``SignLockEmbedding``: a lookup decodes only its
            rows) and an untied LM head; a head tied to the embedding shares its compressed weight.
        codec: magnitude codec, one of "vq" (default), "lowrank", "scale", "exact" (lossless).
        codec_params: the codec's parameters (e.g. ``{"bits": 8, "group": 16}`` for "vq", ``{"rank": 4}`` for
            "lowrank"); parameters left out are chosen per layer to fit ``bits_per_weight``.
        bits_per_weight: total budget per target weight: signs, magnitudes, bias, the layer's record and its share
            of the checkpoint's SignLock overhead all count. None: 1.0 for "vq" and "lowrank"; no budget for the
            fixed-size "scale" and "exact", which refuse a budget they cannot meet.
        dequantize: the modules ``from_pretrained`` gives. True: dense ``nn.Linear`` / ``Conv1D`` (a plain model,
            no quantization config left). False: compressed ``SignLockLinear`` modules that decode their weight in
            each forward (save_pretrained writes the same bytes back). None (default): dense when loading a SignLock
            checkpoint, compressed when quantizing a dense model on load. A loading attribute: a checkpoint's
            config is overridden by ``from_pretrained(repo, quantization_config=SignLockConfig(dequantize=...))``.
        layers, targets_checksum, packed_layers, dtype, base_signs_checksum: written by export (compact layer
            records, the checksum of the target names, the positions in target order of the layers whose signs are
            stored packed because their flips would cost more, the dtype of stored biases, the checksum of the base's
            signs); never set by hand.
    """

    def __init__(self, seed: int | None = None, sign_source: str = "seed", template_rank: int = 8,
                 target_modules: list[str] | str | None = None, target_embeddings: bool = False,
                 codec: str = DEFAULT_CODEC,
                 codec_params: dict[str, Any] | None = None, bits_per_weight: float | None = None,
                 dequantize: bool | None = None, layers: str | None = None, targets_checksum: str | None = None,
                 packed_layers: list[int] | None = None,
                 dtype: str | None = None, base_model: str | None = None, base_revision: str | None = None,
                 base_signs_checksum: str | None = None, format_version: int = EXPORT_FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.seed = seed
        self.sign_source = sign_source
        self.template_rank = template_rank
        self.target_modules = target_modules
        self.target_embeddings = target_embeddings
        self.codec = codec
        self.codec_params = dict(codec_params or {})
        self.bits_per_weight = bits_per_weight
        self.dequantize = dequantize
        self.layers = layers
        self.targets_checksum = targets_checksum
        self.packed_layers = packed_layers
        self.dtype = dtype
        self.base_model = None if base_model is None else str(base_model)  # a Path is accepted; JSON keeps a str
        self.base_revision = base_revision
        self.base_signs_checksum = base_signs_checksum
        self.post_init()

    def post_init(self):
        if self.format_version not in READABLE_EXPORT_FORMATS:
            raise SignLockConfigError(
                f"This checkpoint uses SignLock format version {self.format_version}; this hf_signlock reads versions "
                f"{', '.join(map(str, READABLE_EXPORT_FORMATS))}. Load it with the hf-signlock release that wrote it, or export the trained model "
                "again with this one (`hf-signlock export`)."
            )
        if self.sign_source not in SIGN_SOURCES:
            raise SignLockConfigError(f"`sign_source` must be one of {SIGN_SOURCES}, got {self.sign_source!r}.")
        if self.codec not in CODECS:
            raise SignLockConfigError(f"`codec` must be one of {tuple(CODECS)}, got {self.codec!r}.")
        if self.bits_per_weight is not None and not self.bits_per_weight > 0:
            raise SignLockConfigError(f"`bits_per_weight` must be > 0, got {self.bits_per_weight}.")
        if self.target_embeddings not in (True, False):
            raise SignLockConfigError(f"`target_embeddings` must be True or False, got {self.target_embeddings!r}.")
        if self.packed_layers is not None and not (
                isinstance(self.packed_layers, list) and all(type(i) is int and i >= 0 for i in self.packed_layers)):
            raise CorruptCheckpointError(f"`packed_layers` must be a list of layer positions, got {self.packed_layers!r}")
        if (self.target_embeddings or self.packed_layers) and self.format_version < 5:
            raise SignLockConfigError("`target_embeddings` needs SignLock format version 5; this config says "
                                      f"{self.format_version}. Export the model again.")
        if self.dequantize not in (None, True, False):
            raise SignLockConfigError(f"`dequantize` must be True, False or None, got {self.dequantize!r}.")
        if self.template_rank < 1:
            raise SignLockConfigError(f"`template_rank` must be >= 1, got {self.template_rank}.")
        make_codec(self.codec, self.codec_params)  # unknown codec parameters are refused here, not at export
        if self.sign_source == "base" and not self.base_model:
            raise SignLockConfigError(
                "`sign_source='base'` stores the signs as flips against a base model's signs: pass `base_model` (the "
                "pretrained model the fine-tune started from: a local folder, a Hub id or a sign pack), or use "
                "sign_source='packed'."
            )
        if self.layers is not None:  # a checkpoint's config; a bare one may only carry loading attributes
            self.check_seed()

    def check_seed(self):
        """A seeded sign source needs an integer seed."""
        if self.sign_source in ("packed", "base"):
            return
        if self.seed is None:
            raise SignLockConfigError(
                f"`sign_source={self.sign_source!r}` regenerates signs from a seed: pass `seed` (the run's sign_seed), "
                "or use sign_source='packed' for a model that was not trained from a seeded init."
            )
        check_seed(self.seed)

    @property
    def budget(self) -> float | None:
        """The bits-per-weight budget in force: the one given, else the default of codecs that fit one."""
        if self.bits_per_weight is not None:
            return self.bits_per_weight
        # fixed-size codecs take no default budget, nor do codec parameters that set the size
        return DEFAULT_BITS_PER_WEIGHT if make_codec(self.codec, self.codec_params).needs_budget() else None

    def dequantize_on_load(self, pre_quantized: bool) -> bool:
        """Whether ``from_pretrained`` ends with dense modules (see ``dequantize``)."""
        return pre_quantized if self.dequantize is None else self.dequantize

    # --- layer records ----------------------------------------------------------------------------------------------

    def set_layer_records(self, records: dict[str, dict]) -> None:
        """Store the records of the target layers (``param_name -> record``, in target order)."""
        self.layers = encode_records(list(records.values()), make_codec(self.codec, self.codec_params))
        self.targets_checksum = targets_checksum(list(records))
        packed = [i for i, record in enumerate(records.values()) if record.get("packed_signs")]
        self.packed_layers = packed if packed and self.sign_source != "packed" else None

    def layer_records(self, names: list[str]) -> dict[str, dict]:
        """The records of the target parameters ``names`` (in target order), checked against the stored checksum
        of the names: a config exported from other targets is refused, not paired with the wrong layers."""
        if self.layers is None:
            raise CorruptCheckpointError("this SignLock config holds no layer records: it was not written by export")
        if targets_checksum(names) != self.targets_checksum:
            raise CorruptCheckpointError(
                f"the SignLock records describe other target layers than the {len(names)} this model has "
                f"(target_modules={self.target_modules!r}); the config.json belongs to another architecture or was "
                "edited. Export the model again."
            )
        records = decode_records(self.layers, make_codec(self.codec, self.codec_params))
        if len(records) != len(names):
            raise CorruptCheckpointError(f"config.json holds {len(records)} SignLock layer records for the "
                                         f"{len(names)} target layers of this model")
        for index in self.packed_layers or ():
            if index >= len(records):
                raise CorruptCheckpointError(f"`packed_layers` names layer {index}; this model has {len(records)}")
            records[index]["packed_signs"] = True
        return dict(zip(names, records))

    @property
    def layer_count(self) -> int:
        """How many layers the records describe (0 before export)."""
        return len(decode_records(self.layers, make_codec(self.codec, self.codec_params))) if self.layers else 0

    # transformers copies the model config several times per load; this one is plain JSON and copies several times
    # faster through the C json codec than through copy.deepcopy's generic walk.
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__))

    def __deepcopy__(self, memo):
        clone = copy.copy(self)
        clone.__dict__ = self.to_dict()
        return clone

    def get_loading_attributes(self) -> dict[str, Any]:
        """What ``from_pretrained(..., quantization_config=SignLockConfig(dequantize=False))`` changes in a
        checkpoint's config: the form of the loaded modules, and where its base model is found (``base_model`` with
        its ``base_revision``). Everything else comes from the checkpoint."""
        attributes = {} if self.dequantize is None else {"dequantize": self.dequantize}
        if self.base_model is not None:  # both: a local copy given for a Hub base has no revision
            attributes.update(base_model=self.base_model, base_revision=self.base_revision)
        return attributes
