"""Sub-bit quantization for transformers: ``SignLockConfig``, the ``signlock`` quantizer and ``quantize_model``.

Signs come from the seed or from a base model's signs (only flipped positions are stored, entropy-coded) or are
packed; magnitudes go through a codec. ``from_pretrained`` loads such checkpoints once ``hf_signlock`` is imported,
and quantizes dense models on load given a ``SignLockConfig``. Importing this package is light: the quantizer and its
transformers machinery load with the first use of ``quantize_model`` or ``from_pretrained``.
"""

from .config import DEFAULT_BITS_PER_WEIGHT, SignLockConfig
from .registration import register_when_transformers_loads


def __getattr__(name):
    if name == "quantize_model":
        from .quantize import quantize_model

        return quantize_model
    if name == "SignLockHfQuantizer":
        from .quantizer import SignLockHfQuantizer

        return SignLockHfQuantizer
    if name == "SignLockLinear":
        from .linear import SignLockLinear

        return SignLockLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_BITS_PER_WEIGHT", "SignLockConfig", "SignLockHfQuantizer", "SignLockLinear", "quantize_model",
           "register_when_transformers_loads"]
