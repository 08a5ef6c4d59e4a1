"""A compressed layer's stored bytes: its one ``payload`` tensor, the layout of the tables inside it, and checksums.

One uint8 tensor per layer, because the loader's cost is per stored tensor (one per table was a large part of the
gap to a dense load). Sections go widest element first (in spec order within a width): every offset is then a
multiple of its element size with no padding, so the typed views need no copy and every payload byte is a stored
bit. Checksums are 64-bit XXH3 digests, written into the layer's record at export and checked at load: they
guard against corrupted, truncated or mismatched files, not against forgery (whoever can rewrite a payload can rewrite
the config beside it), and XXH3 hashes at ~13 GB/s where blake2b managed 1 (blake2b was a tenth of a SmolLM2 load).
"""

from __future__ import annotations

import math

import torch
import xxhash

from ...constants import PAYLOAD_AS_WEIGHT_FORMAT

CHECKSUM_BYTES = 8


def payload_key(module_name: str, format_version: int) -> str:
    """The weight-file key of a compressed layer's payload. From format 7 it is the dense weight's own name: a load
    without hf_signlock then meets a size mismatch on every target (transformers stops) rather than a missing weight
    it would initialise at random, and deleting those keys deletes the data itself. Before: ``<layer>.payload``."""
    return f"{module_name}.{'weight' if format_version >= PAYLOAD_AS_WEIGHT_FORMAT else 'payload'}"


def payload_layout(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, tuple]:
    """Where each stored tensor lives in the payload: name -> (offset, bytes, dtype, shape)."""
    layout, offset = {}, 0
    for name, (shape, dtype) in sorted(specs.items(), key=lambda item: -item[1][1].itemsize):
        nbytes = math.prod(shape) * dtype.itemsize
        layout[name] = (offset, nbytes, dtype, tuple(shape))
        offset += nbytes
    return layout


def payload_digest(payload: torch.Tensor) -> str:
    """Checksum of a layer's payload: its size and every byte."""
    digest = xxhash.xxh3_64(f"payload|{payload.numel()}|".encode())
    digest.update(payload.detach().contiguous().cpu().numpy())
    return digest.hexdigest()


def bits_digest(sign_bits: torch.Tensor) -> str:
    """Checksum of bit-packed signs (``pack_signs`` layout)."""
    return xxhash.xxh3_64_hexdigest(sign_bits.detach().cpu().contiguous().numpy())
