"""Reference signs s0 of the target weights: regenerated from the seed, or captured from a pretrained start.

In memory the signs are int8 on each weight's device (the drift term reads them every step; 1 byte per weight,
a quarter of an fp32 copy and far below Adam's state), for the part of the weight this process holds. Seeded
references are never stored: they are a pure function of (seed, name, position). Captured references are kept
whole on the CPU and saved bit-packed (1 bit per weight) with each checkpoint.
"""

from __future__ import annotations

import torch

from ..errors import SignLockConfigError
from ..signs import pack_signs, reference_signs, seeded_signs, unpack_signs
from .init_distribution import TargetWeight
from .sharding import LocalPart, local_part

REFERENCE_MODES = ("seed", "captured")


class SignReference:
    """The reference signs of a list of target weights, keyed by parameter name.

    ``signs(target)`` returns the signs of the part of the weight this process holds (all of it, or its FSDP row
    shard), built on first use on the weight's device and cached while that layout lasts.
    """

    def __init__(self, targets: list[TargetWeight], mode: str, seed: int | None = None, sign_source: str = "seed",
                 template_rank: int = 8, captured: dict[str, torch.Tensor] | None = None):
        self.targets = targets
        self.mode = mode
        self.seed, self.sign_source, self.template_rank = seed, sign_source, template_rank
        self._captured = captured or {}  # whole-tensor int8 signs on the CPU (captured mode)
        self._local: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (flat start, signs of the local part)

    @classmethod
    def from_seed(cls, targets: list[TargetWeight], seed: int, sign_source: str = "seed", template_rank: int = 8):
        return cls(targets, "seed", seed, sign_source, template_rank)

    @classmethod
    @torch.no_grad()
    def capture(cls, targets: list[TargetWeight]):
        """Take each weight's current sign as its reference (zero counts as +1, so it is not a flip later)."""
        for t in targets:
            if t.param.device.type == "meta":
                raise SignLockConfigError(
                    f"reference_mode='captured' needs the pretrained weights in memory, but {t.name!r} is on the meta "
                    "device (FSDP `cpu_ram_efficient_loading`?). Turn that option off for captured runs."
                )
        captured = {t.name: torch.where(local_part(t.name, t.param).tensor >= 0, 1, -1).to(torch.int8).cpu()
                    for t in targets}
        return cls(targets, "captured", captured=captured)

    def full_signs(self, target: TargetWeight) -> torch.Tensor:
        """Signs of the whole weight (int8, its shape, on the CPU)."""
        if self.mode == "captured":
            return self._captured[target.name]
        return reference_signs(self.seed, target.name, target.param.shape, self.sign_source, self.template_rank)

    def signs(self, target: TargetWeight, part: LocalPart | None = None) -> torch.Tensor:
        part = part or local_part(target.name, target.param)
        local = part.tensor
        cached = self._local.get(target.name)
        if cached and cached[0] == part.start and cached[1].shape == local.shape and cached[1].device == local.device:
            return cached[1]
        if self.mode == "seed" and self.sign_source == "seed":  # random access: only the local positions
            s0 = seeded_signs(self.seed, target.name, local.numel(), part.start, device=local.device)
        else:
            s0 = self.full_signs(target).reshape(-1)[part.start : part.start + local.numel()].to(local.device)
        s0 = s0.view(local.shape)
        self._local[target.name] = (part.start, s0)
        return s0

    def is_sharded(self) -> bool:
        return any(local_part(t.name, t.param).sharded for t in self.targets[:1])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to rebuild this reference: nothing for seeded signs."""
        if self.mode == "seed":
            return {}
        return {f"reference.{name}": pack_signs(s0) for name, s0 in self._captured.items()}

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
            self._captured[target.name] = unpack_signs(state[key].cpu(), target.param.shape)
        self._local.clear()
