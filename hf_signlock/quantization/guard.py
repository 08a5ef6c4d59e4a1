"""Guard tensors: a SignLock checkpoint loaded without ``import hf_signlock`` must fail loudly, not load garbage.

Without the import transformers does not know ``signlock``: it logs "Unknown quantization type", skips the
quantization and would randomly initialise the target layers. So every SignLock checkpoint also holds two guard
tensors: a one-byte one under the first target layer's ``.weight`` name, with a shape no model has (transformers
itself raises a size-mismatch error), and one whose name is the fix (listed in transformers' load report above that
error). With hf_signlock imported, both are expected and skipped from the model's weights, and checked: the second
holds the config checksum (format 6), so a checkpoint whose guards were deleted, or taken from another export, is
refused rather than loaded. Together they cost about 260 bytes per checkpoint.
"""

from __future__ import annotations

import torch

from ..errors import CorruptCheckpointError

GUARD_KEY = "hf_signlock_checkpoint.LOAD_NEEDS__pip_install_hf-signlock__and__import_hf_signlock"
GUARD_CHECKSUM_BYTES = 8  # the config checksum, an XXH3-64 digest


def guard_tensors(first_target: str, config_checksum: str | None) -> dict[str, torch.Tensor]:
    """The two guard tensors of a checkpoint whose first target parameter is ``first_target``, the second holding
    ``config_checksum`` (hex)."""
    sealed = torch.frombuffer(bytearray(bytes.fromhex(config_checksum)), dtype=torch.uint8) if config_checksum \
        else torch.zeros(1, dtype=torch.uint8)
    return {first_target: torch.zeros(1, dtype=torch.uint8), GUARD_KEY: sealed.clone()}


def check_guards(stored: dict[str, tuple[list[int], str]], read_guard, first_target: str,
                 config_checksum: str) -> None:
    """Refuse a checkpoint whose guards are missing or do not hold its config checksum. ``stored`` maps every
    tensor name of the checkpoint's files to (shape, dtype); ``read_guard()`` reads the ``GUARD_KEY`` tensor."""
    for key, shape in ((first_target, [1]), (GUARD_KEY, [GUARD_CHECKSUM_BYTES])):
        if key not in stored:
            raise CorruptCheckpointError(f"the checkpoint has no guard tensor `{key}` (a SignLock export always "
                                         "holds it): the weight files were edited. Export the model again.")
        if stored[key] != (shape, "U8"):
            raise CorruptCheckpointError(f"the guard tensor `{key}` is {stored[key]}, not uint8 {shape}: the weight "
                                         "files were edited or belong to another export.")
    if bytes(read_guard().tolist()).hex() != config_checksum:
        raise CorruptCheckpointError("the weight files' guard does not hold this config's checksum: config.json and "
                                     "the weights come from different exports (or were edited). Export again.")
