"""The init distribution each target weight gets from its model's own ``_init_weights``.

The init std of each target is read off by running that method on a meta-device twin of the model with the init
functions replaced by recorders: exact, free of sampling noise, and it picks up per-module rules such as GPT-2's
``1/sqrt(2 n_layer)`` scaling of ``c_proj``. Gap init, the drift margin and the near-zero band are all in units of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SignLockConfigError
from ..targets import find_target_modules


@dataclass(frozen=True)
class InitDistribution:
    """A symmetric init distribution: ``kind`` is "normal" or "uniform", ``std`` its standard deviation."""

    kind: str
    std: float


@dataclass
class TargetWeight:
    """One target weight of a model: its parameter name, the module holding it and its init distribution."""

    name: str  # the parameter's name in model.named_parameters()
    module: nn.Module
    init: InitDistribution

    @property
    def param(self) -> nn.Parameter:
        # Looked up on the module each time: wrappers (DDP, FSDP) may swap the Parameter object, never the module.
        return self.module.weight

    @property
    def init_std(self) -> float:
        return self.init.std


def _fans(tensor: torch.Tensor) -> tuple[int, int]:
    return nn.init._calculate_fan_in_and_fan_out(tensor)


def _kaiming_std(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", **_):
    fan_in, fan_out = _fans(tensor)
    return nn.init.calculate_gain(nonlinearity, a) / math.sqrt(fan_in if mode == "fan_in" else fan_out)


def _xavier_std(tensor, gain=1.0, **_):
    fan_in, fan_out = _fans(tensor)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


# name of init function -> (distribution kind, std as a function of its arguments)
_RECORDED_INITS = {
    "normal_": ("normal", lambda tensor, mean=0.0, std=1.0, **_: std),
    "trunc_normal_": ("normal", lambda tensor, mean=0.0, std=1.0, **_: std),
    "uniform_": ("uniform", lambda tensor, a=0.0, b=1.0, **_: (b - a) / math.sqrt(12.0)),
    "kaiming_normal_": ("normal", _kaiming_std),
    "kaiming_uniform_": ("uniform", _kaiming_std),
    "xavier_normal_": ("normal", _xavier_std),
    "xavier_uniform_": ("uniform", _xavier_std),
}


@contextlib.contextmanager
def _recording_inits(record: dict[int, InitDistribution]) -> Iterator[None]:
    """Replace the init functions of torch and transformers by recorders of ``id(tensor) -> distribution``."""
    from transformers import initialization as hf_init

    saved = []
    for namespace in (torch.nn.init, hf_init):
        for fn_name, (kind, std_of) in _RECORDED_INITS.items():
            if hasattr(namespace, fn_name):

                def recorder(tensor, *args, _kind=kind, _std_of=std_of, **kwargs):
                    record[id(tensor)] = InitDistribution(_kind, float(_std_of(tensor, *args, **kwargs)))
                    return tensor

                saved.append((namespace, fn_name, getattr(namespace, fn_name)))
                setattr(namespace, fn_name, recorder)
    try:
        yield
    finally:
        for namespace, fn_name, fn in saved:
            setattr(namespace, fn_name, fn)


def init_distributions(model: PreTrainedModel, names: Sequence[str]) -> dict[str, InitDistribution]:
    """The distribution the model's ``_init_weights`` gives each named parameter (last init call wins, as in
    ``initialize_weights``: children first, then their parents)."""
    with torch.device("meta"):
        twin = type(model)._from_config(model.config)
    record: dict[int, InitDistribution] = {}

    def visit(module: nn.Module, owner: PreTrainedModel) -> None:
        for child in module.children():
            visit(child, child if isinstance(child, PreTrainedModel) else owner)
        owner._init_weights(module)

    with _recording_inits(record), torch.no_grad():
        visit(twin, twin)
    twin_params = dict(twin.named_parameters(remove_duplicate=False))
    found = {}
    for name in names:
        dist = record.get(id(twin_params.get(name)))
        if dist is None or dist.std <= 0:
            raise SignLockConfigError(
                f"Could not read the init std of {name!r} from {type(model).__name__}._init_weights. "
                "Pass `init_std=<float>` to apply_gap_init / the trainer to state it."
            )
        found[name] = dist
    return found


def resolve_targets(
    model: nn.Module, patterns: str | Sequence[str] | None = None, init_std: float | None = None,
    embeddings: bool = False, lm_head: bool = False,
) -> list[TargetWeight]:
    """The target weights of ``model`` with their init distribution (``init_std`` overrides the model's);
    ``embeddings`` adds the token embedding, ``lm_head`` an untied LM head (see ``find_target_modules``)."""
    modules = find_target_modules(model, patterns, embeddings, lm_head)
    names = [f"{module_name}.weight" for module_name in modules]
    if init_std is not None:
        if not init_std > 0:
            raise SignLockConfigError(f"`init_std` must be > 0, got {init_std}.")
        dists = {name: InitDistribution("normal", float(init_std)) for name in names}
    else:
        dists = init_distributions(model, names)
    return [TargetWeight(name, module, dists[name]) for name, module in zip(names, modules.values())]
