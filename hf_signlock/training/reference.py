"""Reference signs s0 of the target weights: regenerated from the seed, or captured from a pretrained start.

In memory the signs are int8 on each weight's device (the drift term reads them every step; 1 byte per weight,
a quarter of an fp32 copy and far below Adam's state), for the part of the weight this process holds. Seeded
references are never stored: they are a pure function of (seed, name, position). Captured references are kept
whole on the CPU and saved bit-packed (1 bit per weight) with each checkpoint.

Each target also gets its scale ``sigma_l``, the unit of the drift margin and of the near-zero band (``sigma``):

* seeded: the std of the layer's init distribution (``TargetWeight.init_std``), as gap init uses;
* captured: the RMS of the layer's starting weights, ``sqrt(mean(w0^2))``. The config's ``initializer_range`` says
  nothing about a pretrained model's weights (SmolLM2-135M: 0.02, against per-layer RMS 0.047-0.40), so the unit
  is read off the weights the run starts from. RMS rather than std because the margin is a distance from zero, not
  from the mean; the two agree for zero-mean weights (SmolLM2: within 0.01%), and on a freshly initialised model
  the RMS is the init std, so both modes measure d in the same unit. A layer whose starting weights are all zero
  keeps its init std. ``capture(..., scale_from_weights=False)`` keeps the init std (an explicit ``init_std``).
"""

from __future__ import annotations

import math

import torch

from ..errors import SignLockConfigError
from ..signs import pack_signs, reference_signs, seeded_signs, unpack_signs
from .init_distribution import TargetWeight
from .sharding import LocalPart, local_part

REFERENCE_MODES = ("seed", "captured")
SIGMA_SOURCES = ("init_std", "start_rms")  # what SignReference.sigma is: the init std, or the starting weights' RMS


@torch.no_grad()
def weight_rms(weight: torch.Tensor) -> float:
    """``sqrt(mean(w^2))`` of a whole weight, accumulated in float64."""
    return torch.linalg.vector_norm(weight.detach(), dtype=torch.float64).item() / math.sqrt(max(weight.numel(), 1))


class SignReference:
    """The reference signs of a list of target weights, keyed by parameter name.

    ``signs(target)`` returns the signs of the part of the weight this process holds (all of it, or its FSDP row
    shard), built on first use on the weight's device and cached while that layout lasts. ``sigma(target)`` is the
    layer's scale (see the module docstring): ``scales[name]`` where set, else the init std.
    """

    def __init__(self, targets: list[TargetWeight], mode: str, seed: int | None = None, sign_source: str = "seed",
                 template_rank: int = 8, captured: dict[str, torch.Tensor] | None = None,
                 scales: dict[str, float] | None = None):
        self.targets = targets
        self.mode = mode
        self.seed, self.sign_source, self.template_rank = seed, sign_source, template_rank
        self._captured = captured or {}  # whole-tensor int8 signs on the CPU (captured mode)
        self.scales: dict[str, float] = dict(scales or {})  # name -> sigma_l where it is not the init std
        self._local: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (flat start, signs of the local part)

    @classmethod
    def from_seed(cls, targets: list[TargetWeight], seed: int, sign_source: str = "seed", template_rank: int = 8):
        """Seeded reference signs; each layer's sigma is its init std."""
        return cls(targets, "seed", seed, sign_source, template_rank)

    @classmethod
    @torch.no_grad()
    def capture(cls, targets: list[TargetWeight], scale_from_weights: bool = True):
        """Take each weight's current sign as its reference (zero counts as +1, so it is not a flip later) and, with
        ``scale_from_weights``, its current RMS as its sigma (else the init std). The weights must be whole."""
        for t in targets:
            if t.param.device.type == "meta":
                raise SignLockConfigError(
                    f"reference_mode='captured' needs the pretrained weights in memory, but {t.name!r} is on the meta "
                    "device (FSDP `cpu_ram_efficient_loading`?). Turn that option off for captured runs."
                )
        captured = {t.name: torch.where(local_part(t.name, t.param).tensor >= 0, 1, -1).to(torch.int8).cpu()
                    for t in targets}
        scales = {}
        if scale_from_weights:
            for t in targets:
                rms = weight_rms(local_part(t.name, t.param).tensor)
                if rms > 0:  # an all-zero layer has no scale of its own
                    scales[t.name] = rms
        return cls(targets, "captured", captured=captured, scales=scales)

    @property
    def sigma_source(self) -> str:
        """``"start_rms"`` when the layers' sigma is their starting weights' RMS, ``"init_std"`` otherwise."""
        return SIGMA_SOURCES[1] if self.scales else SIGMA_SOURCES[0]

    def sigma(self, target: TargetWeight) -> float:
        """sigma_l of ``target``: the unit of the drift margin and of the near-zero band."""
        return self.scales.get(target.name, target.init_std)

    def full_signs(self, target: TargetWeight) -> torch.Tensor:
        """Signs of the whole weight (int8, its shape, on the CPU)."""
        if self.mode == "captured":
            return self._captured[target.name]
        return reference_signs(self.seed, target.name, target.param.shape, self.sign_source, self.template_rank)

    def signs(self, target: TargetWeight, part: LocalPart | None = None) -> torch.Tensor:
        """int8 signs of the part of ``target`` this process holds (``part``, by default the current one)."""
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
        """Whether the targets are FSDP row shards (each process holds a share of every weight)."""
        return any(local_part(t.name, t.param).sharded for t in self.targets[:1])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to rebuild this reference: nothing for seeded signs."""
        if self.mode == "seed":
            return {}
        return {f"reference.{name}": pack_signs(s0) for name, s0 in self._captured.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore captured signs from ``state_dict()``'s tensors (a no-op for seeded ones)."""
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
