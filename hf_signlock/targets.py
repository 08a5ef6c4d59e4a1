"""Which weights are targets, and the init distribution each one gets from its model.

Targets are the 2-D weights of the linear projections inside the repeated transformer blocks (``nn.Linear`` and
GPT-2's ``Conv1D``). By default that is every such module whose qualified name passes through a numbered block
(``model.layers.3.mlp.up_proj``), which leaves out embeddings, the LM head, norms and biases. Patterns follow PEFT's
``target_modules``: a list of names matches a module whose name equals one or ends with ``"." + name``; a single
string is a regular expression that must match the whole module name.

The init std of each target is what the model's own ``_init_weights`` would give it, read off by running that
method on a meta-device twin of the model with the init functions replaced by recorders: exact, free of sampling
noise, and it picks up per-module rules such as GPT-2's ``1/sqrt(2 n_layer)`` scaling of ``c_proj``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import SignLockConfigError, TargetNotFoundError

TARGET_MODULE_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class InitDistribution:
    """A symmetric init distribution: ``kind`` is "normal" or "uniform", ``std`` its standard deviation."""

    kind: str
    std: float


@dataclass
class TargetWeight:
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


def _in_repeated_block(module_name: str) -> bool:
    return any(part.isdigit() for part in module_name.split("."))


def _matches(module_name: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def find_target_modules(model: nn.Module, patterns: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Map ``module_name -> module`` of the target projections, in model order."""
    output_embeddings = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    linear = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, TARGET_MODULE_TYPES) and module is not output_embeddings
    }
    if patterns is None:
        found = {name: m for name, m in linear.items() if _in_repeated_block(name)}
    else:
        if not isinstance(patterns, str):
            unmatched = [p for p in patterns if not any(_matches(name, [p]) for name in linear)]
            if unmatched:
                raise TargetNotFoundError(_no_match_message(unmatched, linear))
        found = {name: m for name, m in linear.items() if _matches(name, patterns)}
    if not found:
        raise TargetNotFoundError(_no_match_message(patterns, linear))
    return found


def _no_match_message(patterns, linear: dict[str, nn.Module]) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
    return (
        f"`target_modules` {patterns!r} matches no linear module of this model. "
        f"Linear module names here end in: {suffixes}. Use some of those, or leave `target_modules` unset for "
        "every projection inside the transformer blocks."
    )


# --- init distributions, read from the model's own _init_weights ------------------------------------------------


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
    model: nn.Module, patterns: str | Sequence[str] | None = None, init_std: float | None = None
) -> list[TargetWeight]:
    """The target weights of ``model`` with their init distribution (``init_std`` overrides the model's)."""
    modules = find_target_modules(model, patterns)
    names = [f"{module_name}.weight" for module_name in modules]
    if init_std is not None:
        if not init_std > 0:
            raise SignLockConfigError(f"`init_std` must be > 0, got {init_std}.")
        dists = {name: InitDistribution("normal", float(init_std)) for name in names}
    else:
        dists = init_distributions(model, names)
    return [TargetWeight(name, module, dists[name]) for name, module in zip(names, modules.values())]
