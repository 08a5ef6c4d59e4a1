"""The part of a weight this process holds: the whole tensor, or its row shard under FSDP2.

FSDP2 (``fully_shard``, what ``accelerate`` uses with ``fsdp_version: 2``) turns each parameter into a DTensor
split by rows over a 1-D device mesh, ``torch.chunk`` style: with ``c = ceil(rows / world)``, rank ``r`` holds rows
``r*c .. min((r+1)*c, rows)``. The drift term and the flip tracker work on that local block: its reference signs
are the seeded signs of flat positions ``start .. start + numel`` (positions are row-major, so a row block is one
contiguous range), its gradient reaches the shard directly, and counts are summed over the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SignLockConfigError

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch builds without distributed support
    DTensor = Shard = None


@dataclass(frozen=True)
class LocalPart:
    tensor: torch.Tensor  # differentiable view of what this process holds
    start: int  # flat position of its first element in the full parameter
    sharded: bool


def local_part(name: str, param: torch.Tensor) -> LocalPart:
    """The part of ``param`` this process holds: the whole tensor, or its FSDP2 row shard (refused otherwise)."""
    if DTensor is None or not isinstance(param, DTensor):
        return LocalPart(param, 0, False)
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise SignLockConfigError(
            f"{name!r} is a DTensor placed as {placements} on a {mesh.ndim}-D mesh; SignLockTrainer supports "
            "plain FSDP2 sharding (Shard(0) on a 1-D mesh). Use recipes/accelerate/fsdp.yaml or DDP."
        )
    rows = param.shape[0]
    chunk = math.ceil(rows / mesh.size()) if rows else 0
    first_row = min(mesh.get_local_rank() * chunk, rows)
    local = param.to_local()
    if local.shape[0] != min(chunk, rows - first_row):
        raise SignLockConfigError(
            f"{name!r}: this process holds {local.shape[0]} rows, not the {min(chunk, rows - first_row)} of an even "
            f"row split of {rows} rows over {mesh.size()} processes; this sharding layout is not supported."
        )
    return LocalPart(local, first_row * math.prod(param.shape[1:]), True)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes (in place) when a process group is running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


def process_count() -> int:
    """How many processes a sum over them adds up (1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
