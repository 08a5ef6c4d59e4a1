"""Reference signs s0 of the target weights: regenerated from the seed, or captured from a pretrained start.

In memory the signs are int8 on each weight's device (the drift term reads them every step; 1 byte per weight,
a quarter of an fp32 copy and far below Adam's state). Seeded references are never stored: they are a pure function
of (seed, name, position). Captured references are saved bit-packed (1 bit per weight) with each checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import SignLockConfigError
from .signs import reference_signs
from .targets import TargetWeight

REFERENCE_MODES = ("seed", "captured")


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """int8 -1/+1 signs (any shape) -> uint8 bits, 8 per byte, bit k of byte j = position 8j + k is +1."""
    flat = (signs.reshape(-1) > 0).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_signs`."""
    numel = int(torch.Size(shape).numel())
    bits = (packed.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    return (bits.reshape(-1)[:numel].to(torch.int8) * 2 - 1).view(*shape)


class SignReference:
    """The reference signs of a list of target weights, keyed by parameter name."""

    def __init__(self, targets: list[TargetWeight], signs: dict[str, torch.Tensor], mode: str):
        self.targets = targets
        self.mode = mode
        self._signs = signs

    @classmethod
    def from_seed(cls, targets: list[TargetWeight], seed: int, sign_source: str = "seed", template_rank: int = 8):
        signs = {
            t.name: reference_signs(seed, t.name, t.param.shape, sign_source, template_rank, device=t.param.device)
            for t in targets
        }
        return cls(targets, signs, "seed")

    @classmethod
    @torch.no_grad()
    def capture(cls, targets: list[TargetWeight]):
        """Take each weight's current sign as its reference (zero counts as +1, so it is not a flip later)."""
        signs = {t.name: torch.where(t.param >= 0, 1, -1).to(torch.int8) for t in targets}
        return cls(targets, signs, "captured")

    def signs(self, target: TargetWeight) -> torch.Tensor:
        s0 = self._signs[target.name]
        if s0.device != target.param.device:  # the Trainer may move the model after we were built
            s0 = self._signs[target.name] = s0.to(target.param.device)
        return s0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to rebuild this reference: nothing for seeded signs."""
        if self.mode == "seed":
            return {}
        return {f"reference.{name}": pack_signs(s0).cpu() for name, s0 in self._signs.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.mode == "seed":
            return
        for target in self.targets:
            key = f"reference.{target.name}"
            if key not in state:
                raise SignLockConfigError(
                    f"The checkpoint has no captured reference signs for {target.name!r}; it was saved with other "
                    "`target_modules` or another `reference_mode`. Resume with the settings it was trained with."
                )
            self._signs[target.name] = unpack_signs(state[key], target.param.shape).to(target.param.device)
