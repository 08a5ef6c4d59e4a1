"""Guard tensors: a SignLock checkpoint loaded without ``import hf_signlock`` must fail loudly, not load garbage.

Without the import transformers does not know ``signlock``: it logs "Unknown quantization type", skips the
quantization and would randomly initialise the target layers. So every SignLock checkpoint also holds two one-byte
tensors: one under the first target layer's ``.weight`` name, with a shape no model has (transformers itself raises
a size-mismatch error), and one whose name is the fix (listed in transformers' load report above that error). With
hf_signlock imported, both are expected and skipped. Together they cost about 250 bytes per checkpoint.
"""

from __future__ import annotations

import torch

GUARD_KEY = "hf_signlock_checkpoint.LOAD_NEEDS__pip_install_hf-signlock__and__import_hf_signlock"


def guard_tensors(first_target: str) -> dict[str, torch.Tensor]:
    """The two guard tensors of a checkpoint whose first target parameter is ``first_target``."""
    return {first_target: torch.zeros(1, dtype=torch.uint8), GUARD_KEY: torch.zeros(1, dtype=torch.uint8)}
