"""hf_signlock: sign lock-in for Hugging Face Transformers.

Weights keep the sign they were initialised with. Initialise them from a seed (``apply_gap_init``), keep them there
while training (``SignLockTrainer``: outward-drift loss, flip tracking), and the signs cost ~0 bits per weight in a
sub-bit checkpoint (``SignLockConfig``, ``quantize_model``) that ``from_pretrained`` loads back.

``import hf_signlock`` registers quant_method ``signlock`` with transformers and nothing more: every other public
name is imported on first use, so loading a checkpoint never pulls in the training stack or ``datasets``.
"""

from importlib import import_module

from .constants import SIGNS_FORMAT_VERSION
from .errors import (
    BaseArchitectureError,
    BaseModelError,
    BaseModelNotFoundError,
    BaseSignsMismatchError,
    BudgetError,
    CorruptCheckpointError,
    DataError,
    HubUnreachableError,
    MissingDependencyError,
    ModelLoadError,
    NonFiniteLossError,
    RecipeError,
    SignLockConfigError,
    SignLockError,
    TargetNotFoundError,
)
from .quantization import SignLockConfig, register_when_transformers_loads

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    # signs
    "seeded_signs": "hf_signlock.signs",
    "seeded_sign_bits": "hf_signlock.signs",
    "template_signs": "hf_signlock.signs",
    "reference_signs": "hf_signlock.signs",
    "sign_key": "hf_signlock.signs",
    "pack_signs": "hf_signlock.signs",
    "unpack_signs": "hf_signlock.signs",
    "find_target_modules": "hf_signlock.targets",
    # quantization
    "quantize_model": "hf_signlock.quantization.quantize",
    "SignLockHfQuantizer": "hf_signlock.quantization.quantizer",
    "SignLockLinear": "hf_signlock.quantization.linear",
    "export_run": "hf_signlock.quantization.export",
    "save_sign_pack": "hf_signlock.quantization.base_signs",
    "checkpoint_report": "hf_signlock.quantization.bits",
    "write_bits_report": "hf_signlock.quantization.bits",
    "get_lora_config": "hf_signlock.quantization.lora",
    "register_lora_modules": "hf_signlock.quantization.lora",
    "SignLockLoraLinear": "hf_signlock.quantization.lora",
    "push_to_hub": "hf_signlock.hub",
    "push_folder": "hf_signlock.hub",
    "write_model_card": "hf_signlock.cards",
    # training
    "SignLockTrainer": "hf_signlock.training.trainer",
    "SignLockTrainingArguments": "hf_signlock.training.arguments",
    "apply_gap_init": "hf_signlock.training.gap_init",
    "gap_floor": "hf_signlock.training.gap_init",
    "gap_scale": "hf_signlock.training.gap_init",
    "outward_drift": "hf_signlock.training.drift",
    "FlipTracker": "hf_signlock.training.tracking",
    "geometric_tail_ratio": "hf_signlock.training.tracking",
    "SignReference": "hf_signlock.training.reference",
    "InitDistribution": "hf_signlock.training.init_distribution",
    "TargetWeight": "hf_signlock.training.init_distribution",
    "resolve_targets": "hf_signlock.training.init_distribution",
    # evaluation
    "evaluate_folder": "hf_signlock.evaluation.perplexity",
    "evaluate_model": "hf_signlock.evaluation.perplexity",
    "perplexity": "hf_signlock.evaluation.perplexity",
    "sliding_window_perplexity": "hf_signlock.evaluation.perplexity",
    "ReferenceSigns": "hf_signlock.evaluation.references",
    "resolve_reference": "hf_signlock.evaluation.references",
    "flip_report": "hf_signlock.evaluation.sign_metrics",
    "analyze": "hf_signlock.evaluation.analyze",
    "run_sweep": "hf_signlock.evaluation.sweep",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_signlock' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


register_when_transformers_loads()

__all__ = [
    "SIGNS_FORMAT_VERSION",
    "BaseArchitectureError",
    "BaseModelError",
    "BaseModelNotFoundError",
    "BaseSignsMismatchError",
    "BudgetError",
    "CorruptCheckpointError",
    "DataError",
    "FlipTracker",
    "HubUnreachableError",
    "InitDistribution",
    "MissingDependencyError",
    "ModelLoadError",
    "NonFiniteLossError",
    "RecipeError",
    "ReferenceSigns",
    "SignLockConfig",
    "SignLockConfigError",
    "SignLockError",
    "SignLockHfQuantizer",
    "SignLockLinear",
    "SignLockLoraLinear",
    "SignLockTrainer",
    "SignLockTrainingArguments",
    "SignReference",
    "TargetNotFoundError",
    "TargetWeight",
    "analyze",
    "apply_gap_init",
    "checkpoint_report",
    "evaluate_folder",
    "evaluate_model",
    "export_run",
    "find_target_modules",
    "flip_report",
    "gap_floor",
    "gap_scale",
    "geometric_tail_ratio",
    "get_lora_config",
    "outward_drift",
    "pack_signs",
    "perplexity",
    "push_folder",
    "push_to_hub",
    "quantize_model",
    "reference_signs",
    "register_lora_modules",
    "resolve_reference",
    "resolve_targets",
    "run_sweep",
    "save_sign_pack",
    "seeded_sign_bits",
    "seeded_signs",
    "sign_key",
    "sliding_window_perplexity",
    "template_signs",
    "unpack_signs",
    "write_bits_report",
]
