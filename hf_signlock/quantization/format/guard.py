"""Guards: a SignLock checkpoint loaded without ``import hf_signlock`` must fail loudly, not load garbage.

Without the import transformers does not know ``signlock``: it logs "Unknown quantization type", skips the
quantization and loads the file as a plain model. From format 7 every compressed layer's payload is stored under
its dense weight's own name (``<layer>.weight``, a uint8 vector no dense weight has the shape of): transformers
stops on a size mismatch at every target, and the data and the guard are one, so no tensor can be deleted to make
the file load as a plain model with random layers (deleting the payloads deletes the model). Beside them a small
tensor whose name is the fix (listed in transformers' load report) holds the config checksum: with hf_signlock
imported it is checked, so a checkpoint whose config and weights come from different exports is refused. (Format 6
kept a one-byte guard under the first target's ``.weight`` name instead; formats 4 and 5 held no checksum.)
"""

from __future__ import annotations

import torch

from ...constants import PAYLOAD_AS_WEIGHT_FORMAT
from ...errors import CorruptCheckpointError

GUARD_KEY = "hf_signlock_checkpoint.LOAD_NEEDS__pip_install_hf-signlock__and__import_hf_signlock"
GUARD_CHECKSUM_BYTES = 8  # the config checksum, an XXH3-64 digest


def guard_tensors(config_checksum: str) -> dict[str, torch.Tensor]:
    """The guard tensor of a checkpoint sealed with ``config_checksum`` (hex)."""
    return {GUARD_KEY: torch.frombuffer(bytearray(bytes.fromhex(config_checksum)), dtype=torch.uint8).clone()}


def guard_keys(first_target: str, format_version: int) -> list[str]:
    """The guard tensors a checkpoint of ``format_version`` holds."""
    return [GUARD_KEY] if format_version >= PAYLOAD_AS_WEIGHT_FORMAT else [first_target, GUARD_KEY]


def check_guards(stored: dict[str, tuple[list[int], str]], read_guard, first_target: str, config_checksum: str,
                 format_version: int) -> None:
    """Refuse a checkpoint whose guards are missing or do not hold its config checksum. ``stored`` maps every
    tensor name of the checkpoint's files to (shape, dtype); ``read_guard()`` reads the ``GUARD_KEY`` tensor."""
    shapes = {GUARD_KEY: [GUARD_CHECKSUM_BYTES], first_target: [1]}
    for key in guard_keys(first_target, format_version):
        if key not in stored:
            raise CorruptCheckpointError(f"the checkpoint has no guard tensor `{key}` (a SignLock export always "
                                         "holds it): the weight files were edited. Export the model again.")
        if stored[key] != (shapes[key], "U8"):
            raise CorruptCheckpointError(f"the guard tensor `{key}` is {stored[key]}, not uint8 {shapes[key]}: the "
                                         "weight files were edited or belong to another export.")
    if bytes(read_guard().tolist()).hex() != config_checksum:
        raise CorruptCheckpointError("the weight files' guard does not hold this config's checksum: config.json and "
                                     "the weights come from different exports (or were edited). Export again.")
