"""hf_signlock: sign lock-in for Hugging Face Transformers.

Weights keep the sign they were initialised with. Initialise them from a seed (``apply_gap_init``), keep them there
while training (``SignLockTrainer``: outward-drift loss, flip tracking), and the signs cost ~0 bits per weight.
"""

from .drift import outward_drift
from .errors import (
    CorruptCheckpointError,
    DataError,
    NonFiniteLossError,
    RecipeError,
    SignLockConfigError,
    SignLockError,
    TargetNotFoundError,
)
from .export import quantize_model
from .gap_init import apply_gap_init, gap_floor, gap_scale
from .quant_config import SignLockConfig
from .quantizer import SignLockHfQuantizer
from .reference import SignReference, pack_signs, unpack_signs
from .signs import SIGNS_FORMAT_VERSION, reference_signs, seeded_sign_bits, seeded_signs, sign_key, template_signs
from .targets import InitDistribution, TargetWeight, find_target_modules, resolve_targets
from .tracking import FlipTracker, geometric_tail_ratio
from .trainer import SignLockTrainer
from .training_args import SignLockTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "CorruptCheckpointError",
    "SignLockConfig",
    "SignLockHfQuantizer",
    "quantize_model",
    "SIGNS_FORMAT_VERSION",
    "DataError",
    "FlipTracker",
    "InitDistribution",
    "NonFiniteLossError",
    "RecipeError",
    "SignLockConfigError",
    "SignLockError",
    "SignLockTrainer",
    "SignLockTrainingArguments",
    "SignReference",
    "TargetNotFoundError",
    "TargetWeight",
    "apply_gap_init",
    "find_target_modules",
    "gap_floor",
    "gap_scale",
    "geometric_tail_ratio",
    "outward_drift",
    "pack_signs",
    "reference_signs",
    "resolve_targets",
    "seeded_sign_bits",
    "seeded_signs",
    "sign_key",
    "template_signs",
    "unpack_signs",
]
