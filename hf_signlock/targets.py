"""Which modules are targets: the linear projections inside the repeated transformer blocks.

Targets are the 2-D weights of the linear projections inside the repeated transformer blocks (``nn.Linear`` and
GPT-2's ``Conv1D``). By default that is every such module whose qualified name passes through a numbered block
(``model.layers.3.mlp.up_proj``), which leaves out embeddings, the LM head, norms and biases. Patterns follow PEFT's
``target_modules``: a list of names matches a module whose name equals one or ends with ``"." + name``; a single
string is a regular expression that must match the whole module name.

Training and export both select their targets here, so a checkpoint's layers are the run's targets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import TargetNotFoundError

TARGET_MODULE_TYPES = (nn.Linear, Conv1D)


def _in_repeated_block(module_name: str) -> bool:
    return any(part.isdigit() for part in module_name.split("."))


def _matches(module_name: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def find_target_modules(model: nn.Module, patterns: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Map ``module_name -> module`` of the target projections, in model order."""
    from transformers.modeling_utils import PreTrainedModel  # the loader imports us while defining it

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
