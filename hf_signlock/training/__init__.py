"""Training with sign lock-in: seeded gap init, the outward-drift loss, flip tracking, and the Trainer that runs them.

Read in this order: ``init_distribution`` (targets and their init std), ``gap_init``, ``reference`` (the reference
signs), ``drift``, ``tracking``, ``sharding`` (FSDP2 row shards), ``arguments``, ``trainer``; ``run`` and ``recipe``
are the job behind ``hf-signlock train``. Nothing here imports ``hf_signlock.quantization``.
"""

from .arguments import SignLockTrainingArguments
from .drift import outward_drift
from .gap_init import apply_gap_init, gap_floor, gap_scale
from .init_distribution import InitDistribution, TargetWeight, resolve_targets
from .reference import SignReference
from .tracking import FlipTracker, geometric_tail_ratio
from .trainer import SignLockTrainer

__all__ = ["FlipTracker", "InitDistribution", "SignLockTrainer", "SignLockTrainingArguments", "SignReference",
           "TargetWeight", "apply_gap_init", "gap_floor", "gap_scale", "geometric_tail_ratio", "outward_drift",
           "resolve_targets"]
