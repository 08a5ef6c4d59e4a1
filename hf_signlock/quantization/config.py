"""``SignLockConfig``: the ``quantization_config`` of a sub-bit checkpoint whose signs come from a seed.

Registered with transformers as quant_method ``signlock`` (``registration.py``): ``config.json`` carries it, and ``from_pretrained``
rebuilds the model from it once ``hf_signlock`` is imported. Passed to ``from_pretrained`` of a dense model, it
compresses the model while loading. Besides the user's choices, an exported config holds one compact record per
target layer (``layers``: what loading checks, see ``records.py``) and a checksum of the target names.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import xxhash
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..constants import CHECKSUMMED_FORMAT, EXPORT_FORMAT_VERSION, QUANT_METHOD, READABLE_EXPORT_FORMATS
from ..errors import CorruptCheckpointError, SignLockConfigError
from ..signs import check_seed
from .codecs import CODECS, DEFAULT_CODEC, make_codec
from .format.records import decode_records, encode_records, targets_checksum

SIGN_SOURCES = ("seed", "template", "packed", "base")
DTYPES = ("float32", "bfloat16", "float16")
MAX_TEMPLATE_RANK = 4096  # a template is a low-rank sign pattern; a layer's own shape bounds it further at load
# Every field that decides how a checkpoint's bytes decode: the config checksum covers them (with the targets'
# shapes). Loading attributes (dequantize, where the base model is found) are left out: a user may change them.
DECODING_FIELDS = ("format_version", "seed", "sign_source", "template_rank", "target_modules", "target_embeddings",
                   "codec", "codec_params", "bits_per_weight", "layers", "targets_checksum", "packed_layers", "dtype",
                   "base_signs_checksum")
_CODEC_PARAM_TYPES = {"bits": int, "group": int, "rank": int, "iterations": int, "row_scales": str, "shared": bool}
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
        dequantize: the modules ``from_pretrained`` gives. True: dense ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``
            (a plain model, no quantization config left). False: compressed ``SignLockLinear`` / ``SignLockEmbedding``
            modules that compute from the stored bytes (on the CPU, the compressed-domain kernels of
            ``hf_signlock.kernels``; save_pretrained writes the same bytes back). None (default): compressed, as
            bitsandbytes, GPTQ or AQLM checkpoints load, wherever the kernels run (the "signmag" and "vq" codecs on the
            CPU); dense otherwise (the other codecs, or a model loaded onto a GPU, where a compressed layer would
            decode its weight in every forward). A loading attribute: a checkpoint's config is overridden by
            ``from_pretrained(repo, quantization_config=SignLockConfig(dequantize=...))``.
        layers, targets_checksum, packed_layers, dtype, base_signs_checksum, config_checksum: written by export
            (compact layer records, the checksum of the target names, the positions in target order of the layers
            whose signs are stored packed because their flips would cost more, the dtype of stored biases, the
            checksum of the base's signs, a checksum of every field that decides how the bytes decode and of the
            targets' shapes, which loading checks first); never set by hand.
    """

    def __init__(self, seed: int | None = None, sign_source: str = "seed", template_rank: int = 8,
                 target_modules: list[str] | str | None = None, target_embeddings: bool = False,
                 codec: str = DEFAULT_CODEC,
                 codec_params: dict[str, Any] | None = None, bits_per_weight: float | None = None,
                 dequantize: bool | None = None, layers: str | None = None, targets_checksum: str | None = None,
                 packed_layers: list[int] | None = None,
                 dtype: str | None = None, base_model: str | None = None, base_revision: str | None = None,
                 base_signs_checksum: str | None = None, config_checksum: str | None = None,
                 format_version: int = EXPORT_FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.seed = seed
        self.sign_source = sign_source
        self.template_rank = template_rank
        self.target_modules = target_modules
        self.target_embeddings = target_embeddings
        self.codec = codec
        # a copy of a dict; anything else is left for post_init to refuse by name
        self.codec_params = dict(codec_params) if isinstance(codec_params, dict) else codec_params or {}
        self.bits_per_weight = bits_per_weight
        self.dequantize = dequantize
        self.layers = layers
        self.targets_checksum = targets_checksum
        self.packed_layers = packed_layers
        self.dtype = dtype
        # a Path is accepted; JSON keeps a str (anything else is refused by post_init)
        self.base_model = str(base_model) if hasattr(base_model, "__fspath__") else base_model
        self.base_revision = base_revision
        self.base_signs_checksum = base_signs_checksum
        self.config_checksum = config_checksum
        self.post_init()

    def _check_types(self):
        """Every field of the right JSON type and range before anything uses it: a config.json may be crafted."""
        def refuse(field, expected):
            raise SignLockConfigError(f"quantization_config `{field}` must be {expected}, got "
                                      f"{getattr(self, field)!r:.200}. A config.json written by export is never so: "
                                      "export the model again, or fix the field.")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            refuse("format_version", "an integer")
        for field in ("codec", "sign_source"):
            if not isinstance(getattr(self, field), str):
                refuse(field, "a string")
        for field in ("layers", "targets_checksum", "dtype", "base_model", "base_revision", "base_signs_checksum",
                      "config_checksum"):
            if getattr(self, field) is not None and not isinstance(getattr(self, field), str):
                refuse(field, "a string or null")
        if self.dtype is not None and self.dtype not in DTYPES:
            refuse("dtype", f"one of {DTYPES} or null")
        if isinstance(self.template_rank, bool) or not isinstance(self.template_rank, int) or not (
                1 <= self.template_rank <= MAX_TEMPLATE_RANK):
            refuse("template_rank", f"an integer from 1 to {MAX_TEMPLATE_RANK}")
        modules = self.target_modules
        if not (modules is None or isinstance(modules, str) or (
                isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules))):
            refuse("target_modules", "null, a regular expression or a list of module names")
        if not isinstance(self.codec_params, dict):
            refuse("codec_params", "an object of codec parameters")
        for name, value in self.codec_params.items():
            kind = _CODEC_PARAM_TYPES.get(name)
            wrong = kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool)))
            if wrong or (kind is int and not 1 <= value <= 1 << 24):
                expected = "a whole number from 1 to 2**24" if kind is int else kind.__name__
                raise SignLockConfigError(f"codec parameter `{name}` must be {expected}, got {value!r:.100}, e.g. "
                                          'codec_params={"bits": 8, "group": 16}.')
        bits = self.bits_per_weight
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits)
                                 or bits <= 0):
            refuse("bits_per_weight", "a finite number > 0 or null")

    def post_init(self):
        self._check_types()
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

    def dequantize_on_load(self, pre_quantized: bool, on_cpu: bool = True) -> bool:
        """Whether ``from_pretrained`` ends with dense modules (see ``dequantize``); ``on_cpu``: whether the compressed
        layers were loaded onto the CPU."""
        if self.dequantize is not None:
            return self.dequantize
        return pre_quantized and not (on_cpu and make_codec(self.codec, self.codec_params).has_kernels)

    # --- layer records ----------------------------------------------------------------------------------------------

    def set_layer_records(self, records: dict[str, dict], shapes: dict[str, tuple[int, ...]]) -> None:
        """Store the records of the target layers (``param_name -> record``, in target order) and seal the config:
        ``config_checksum`` over every decoding field and the targets' ``shapes`` (``param_name -> shape``)."""
        self.layers = encode_records(list(records.values()), make_codec(self.codec, self.codec_params))
        self.targets_checksum = targets_checksum(list(records))
        packed = [i for i, record in enumerate(records.values()) if record.get("packed_signs")]
        self.packed_layers = packed if packed and self.sign_source != "packed" else None
        self.format_version = EXPORT_FORMAT_VERSION  # what it writes now is sealed, whatever it was loaded from
        self.config_checksum = self.decoding_checksum(shapes)

    def decoding_checksum(self, shapes: dict[str, tuple[int, ...]]) -> str:
        """Checksum of every field that decides how the checkpoint's bytes decode (``DECODING_FIELDS``: codec and
        its parameters, records, sign source, format version, ...) and of the target weights' names and shapes."""
        fields = {name: getattr(self, name) for name in DECODING_FIELDS}
        text = json.dumps([fields, [[name, list(shape)] for name, shape in shapes.items()]], sort_keys=True,
                          separators=(",", ":"))
        return xxhash.xxh3_64_hexdigest(text.encode())

    def check_checksum(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse a checkpoint config whose decoding fields or target shapes are not those export sealed (an edited
        or corrupted config.json, or the config of another model). Formats before 6 carry no checksum."""
        if self.format_version < CHECKSUMMED_FORMAT:
            return
        if self.config_checksum is None:
            raise CorruptCheckpointError("this SignLock config has no `config_checksum` (format 6 seals every field "
                                         "that decides how the weights decode): config.json was edited. Export the "
                                         "model again.")
        if self.decoding_checksum(shapes) != self.config_checksum:
            raise CorruptCheckpointError(
                "the SignLock quantization_config or the model's shapes are not those the checkpoint was exported with "
                "(their checksum differs): config.json was edited or corrupted, or belongs to another model. Nothing "
                "was decoded; export the model again or restore the file."
            )

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
            # ...and marked as the caller's: a base the checkpoint's own config names is looked for only inside its
            # folder or on the Hub (see base_signs.base_named_by_checkpoint); one the caller names, anywhere.
            attributes.update(base_model=self.base_model, base_revision=self.base_revision,
                              base_model_from_caller=True)
        return attributes
