"""``SignLockConfig``: the ``quantization_config`` of a sub-bit checkpoint whose signs come from a seed.

Registered with transformers as quant_method ``signlock``; ``config.json`` carries it, and ``from_pretrained``
rebuilds the model from it once ``hf_signlock`` is imported. Besides the user's choices it records, per target
layer, what loading needs to check the file: the stored shape, the flip count and checksums of the stored tensors
and of the decoded signs.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers import register_quantization_config
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import SignLockConfigError

EXPORT_FORMAT_VERSION = 2  # 2: one `payload` tensor per layer (1: one tensor per table)
SIGN_SOURCES = ("seed", "template", "packed")
CODECS = ("exact", "scale", "vq", "lowrank")
QUANT_METHOD = "signlock"


class SignLockConfig(QuantizationConfigMixin):
    """How a SignLock checkpoint stores its target layers.

    Args:
        seed: the sign seed the model was initialised with (``sign_source`` "seed" or "template").
        sign_source: "seed" (signs regenerated from the seed, flips stored), "template" (low-rank seeded template,
            flips stored) or "packed" (explicit 1-bit signs: for models not trained from our seeded init).
        template_rank: rank of the template (``sign_source="template"``).
        target_modules: patterns of the modules to compress (None: every Linear/Conv1D inside the repeated blocks).
        codec: magnitude codec, one of "exact", "scale", "vq", "lowrank".
        codec_params: the codec's parameters (e.g. ``{"bits": 8, "group": 16}`` for "vq", ``{"rank": 4}`` for
            "lowrank"); parameters left out are chosen per layer to fit ``bits_per_weight``.
        bits_per_weight: total budget per target weight (signs, magnitudes, bias and records all counted).
        dequantize: load as dense ``nn.Linear`` (True) or keep compressed modules that rebuild their weight when
            used (False). Chosen at export; a loader overrides it with
            ``from_pretrained(repo, quantization_config=SignLockConfig(dequantize=...))``.
        layers: filled by export: per-layer records (shape, flips, checksums); not set by hand.
    """

    def __init__(self, seed: int | None = None, sign_source: str = "seed", template_rank: int = 8,
                 target_modules: list[str] | str | None = None, codec: str = "exact",
                 codec_params: dict[str, Any] | None = None, bits_per_weight: float | None = None,
                 dequantize: bool = True,
                 layers: dict[str, dict] | None = None, format_version: int = EXPORT_FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.seed = seed
        self.sign_source = sign_source
        self.template_rank = template_rank
        self.target_modules = target_modules
        self.codec = codec
        self.codec_params = dict(codec_params or {})
        self.bits_per_weight = bits_per_weight
        self.dequantize = dequantize
        self.layers = dict(layers or {})
        self.post_init()

    def post_init(self):
        if self.format_version != EXPORT_FORMAT_VERSION:
            raise SignLockConfigError(
                f"This checkpoint uses SignLock format version {self.format_version}; this hf_signlock reads version "
                f"{EXPORT_FORMAT_VERSION}. Load it with the hf-signlock release that wrote it, or export the trained model "
                "again with this one (`hf-signlock export`)."
            )
        if self.sign_source not in SIGN_SOURCES:
            raise SignLockConfigError(f"`sign_source` must be one of {SIGN_SOURCES}, got {self.sign_source!r}.")
        if self.codec not in CODECS:
            raise SignLockConfigError(f"`codec` must be one of {CODECS}, got {self.codec!r}.")
        if self.bits_per_weight is not None and not self.bits_per_weight > 0:
            raise SignLockConfigError(f"`bits_per_weight` must be > 0, got {self.bits_per_weight}.")
        if self.layers:  # a checkpoint's config; a bare one may only carry loading attributes (see below)
            self.check_seed()

    def check_seed(self):
        if self.sign_source != "packed" and self.seed is None:
            raise SignLockConfigError(
                f"`sign_source={self.sign_source!r}` regenerates signs from a seed: pass `seed` (the run's sign_seed), "
                "or use sign_source='packed' for a model that was not trained from a seeded init."
            )

    # transformers copies the model config several times per load; the per-layer records are plain JSON and copy
    # several times faster through the C json codec than through copy.deepcopy's generic walk.
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__))

    def __deepcopy__(self, memo):
        clone = copy.copy(self)
        clone.__dict__ = self.to_dict()
        return clone

    def get_loading_attributes(self) -> dict[str, Any]:
        """What ``from_pretrained(..., quantization_config=SignLockConfig(dequantize=False))`` changes in a
        checkpoint's config: the form of the loaded modules. Everything else comes from the checkpoint."""
        return {"dequantize": self.dequantize}


def _accept_loading_attributes():
    """transformers applies loading attributes only for the config classes in this tuple; add ours."""
    if SignLockConfig not in quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES,
                                                           SignLockConfig)


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:  # a module reload must not register twice
    register_quantization_config(QUANT_METHOD)(SignLockConfig)
_accept_loading_attributes()
