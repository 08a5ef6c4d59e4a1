"""Which modules are targets: the linear projections inside the repeated transformer blocks, and optionally the
token embedding and the LM head.

Targets are the 2-D weights of the linear projections inside the repeated transformer blocks (``nn.Linear`` and
GPT-2's ``Conv1D``). By default that is every such module whose qualified name passes through a numbered block
(``model.layers.3.mlp.up_proj``), which leaves out embeddings, the LM head, norms and biases. Patterns follow PEFT's
``target_modules``: a list of names matches a module whose name equals one or ends with ``"." + name`` (naming the
token embedding or the LM head makes it a target too, as a run's recorded targets do); a single string is a regular
expression that must match the whole module name.

``embeddings=True`` adds the token embedding (``model.get_input_embeddings()``, an ``nn.Embedding``), ``lm_head=True``
the LM head (``model.get_output_embeddings()``, an ``nn.Linear``) when it is not tied to the embedding. A head tied
to the embedding is one tensor: the embedding is its target, keyed by the embedding's parameter name, counted once.
Compression takes both (``SignLockConfig(target_embeddings=True)``); training can take the embedding alone, since
locking an untied head's signs costs perplexity (see ``SignLockTrainingArguments.target_lm_head``).

Training and export both select their targets here, so a checkpoint's layers are the run's targets.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import SignLockConfigError, TargetNotFoundError

TARGET_MODULE_TYPES = (nn.Linear, Conv1D)


def _in_repeated_block(module_name: str) -> bool:
    return any(part.isdigit() for part in module_name.split("."))


def _matches(module_name: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return safe_pattern(patterns).fullmatch(module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


try:  # the parser re itself uses (re._parser from Python 3.11, sre_parse before)
    from re import _constants as _sre_constants
    from re import _parser as _sre_parser
except ImportError:  # pragma: no cover (Python 3.10)
    import sre_constants as _sre_constants
    import sre_parse as _sre_parser

_REPEATS = tuple(getattr(_sre_constants, name) for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                 if hasattr(_sre_constants, name))
MAX_PATTERN_LENGTH = 1000
MAX_REPEATS = 4


@functools.lru_cache(maxsize=64)
def safe_pattern(pattern: str) -> re.Pattern:
    """``pattern`` compiled, if it matches in time linear in the name: a pattern read from a config file is input,
    and a nested repetition such as ``(a+)+$`` backtracks for hours on one module name. Refused: repetition of
    something that itself repeats or branches, backreferences, lookarounds, patterns over 1000 characters. What
    target patterns need (``.*``, ``\\d+``, alternatives of names, ``[^.]+``) passes."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise SignLockConfigError(f"`target_modules` is a {len(pattern):,}-character pattern; give at most "
                                  f"{MAX_PATTERN_LENGTH}, or a list of module names.")
    try:
        compiled = re.compile(pattern)
        tree = _sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise SignLockConfigError(f"`target_modules` {pattern!r:.200} is not a regular expression ({error}); give a "
                                  "valid one, or a list of module names.") from None
    problem = _backtracking_risk(tree, inside_repeat=False)
    if not problem and _repeat_count(tree) > MAX_REPEATS:  # side by side, k of them still backtrack as n ** k
        problem = f"has more than {MAX_REPEATS} repetitions"
    if problem:
        raise SignLockConfigError(
            f"`target_modules` {pattern!r:.200} {problem}, which can take hours to match one name; rewrite it "
            "without nesting (e.g. r'.*\\.(q_proj|v_proj)'), or give a list of module names."
        )
    return compiled


def _repeat_count(tree) -> int:
    """Unbounded or ranged repetitions anywhere in the parsed pattern ``tree``."""
    count = 0
    for op, value in tree:
        if op in _REPEATS:
            count += (value[0] != value[1]) + _repeat_count(value[2])
        elif op == _sre_constants.SUBPATTERN:
            count += _repeat_count(value[-1])
        elif op == _sre_constants.BRANCH:
            count += max(_repeat_count(branch) for branch in value[1])
    return count


def _backtracking_risk(tree, inside_repeat: bool) -> str | None:
    """Why the parsed pattern ``tree`` may backtrack exponentially, or None."""
    constants = _sre_constants
    for op, value in tree:
        if op in (constants.GROUPREF, constants.GROUPREF_EXISTS):
            return "uses a backreference"
        if op in (constants.ASSERT, constants.ASSERT_NOT):
            return "uses a lookaround"
        if op in _REPEATS:
            low, high, body = value
            if inside_repeat and high != low:
                return "repeats a repetition"
            problem = _backtracking_risk(body, inside_repeat or high > 1)
            if problem:
                return problem
        elif op == constants.BRANCH:
            if inside_repeat:
                return "repeats a group of alternatives"
            for branch in value[1]:
                problem = _backtracking_risk(branch, inside_repeat)
                if problem:
                    return problem
        elif op == constants.SUBPATTERN:
            problem = _backtracking_risk(value[-1], inside_repeat)
            if problem:
                return problem
        elif op == getattr(constants, "ATOMIC_GROUP", None):
            problem = _backtracking_risk(value, inside_repeat)
            if problem:
                return problem
    return None


def _embedding_modules(model: nn.Module, embedding_target: bool, head_target: bool) -> dict[int, nn.Module]:
    """``id(module) -> module`` of the token embedding and an untied LM head (as asked), refused where they are shared
    in a way a compressed layer cannot serve (which modules hold the same tensor; ``tied_head`` says whether the
    head is tied)."""
    from transformers.modeling_utils import PreTrainedModel  # the loader imports us while defining it

    if not isinstance(model, PreTrainedModel):
        raise SignLockConfigError(
            f"target_embeddings needs a transformers PreTrainedModel (its get_input_embeddings), not "
            f"{type(model).__name__}."
        )
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        raise SignLockConfigError(
            f"This model's token embedding is a {type(embedding).__name__}"
            f"{' with max_norm' if type(embedding) is nn.Embedding else ''}; SignLock compresses plain nn.Embedding "
            "lookups only (a subclass may scale or transform its rows). Set target_embeddings=False to keep it dense."
        )
    found = {id(embedding): embedding} if embedding_target else {}
    holders = {}  # id(tensor) -> modules holding it as their weight
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            holders.setdefault(id(weight), []).append(module)
    tied = tied_head(model)
    allowed = {id(embedding)} | ({id(head)} if tied else set())
    if {id(m) for m in holders[id(embedding.weight)]} - allowed:
        raise SignLockConfigError(
            "This model's token embedding weight is shared with modules other than its LM head; SignLock can compress "
            "an embedding used alone or tied to the head only. Set target_embeddings=False to keep it dense."
        )
    if head is not None and not tied and head_target:
        if type(head) is not nn.Linear:
            raise SignLockConfigError(
                f"This model's LM head is a {type(head).__name__}; SignLock compresses an nn.Linear head only. Set "
                "target_embeddings=False to keep it dense."
            )
        if len(holders[id(head.weight)]) > 1:
            raise SignLockConfigError(
                "This model's LM head weight is shared with another module than its token embedding; SignLock cannot "
                "compress it. Set target_embeddings=False to keep it dense."
            )
        found[id(head)] = head
    return found


def tied_head(model: nn.Module) -> bool:
    """Whether the model's LM head uses its token embedding's weight (one tensor): the same Parameter, or tied by
    name in ``model.all_tied_weights_keys`` (what ``from_pretrained`` ties after loading; on the meta device the two
    are still apart)."""
    from transformers.modeling_utils import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, nn.Parameter):
        return False
    if weight is getattr(embedding, "weight", None):
        return True
    names = {id(module): name for name, module in model.named_modules()}
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    return ties.get(f"{names.get(id(head))}.weight") == f"{names.get(id(embedding))}.weight"


def find_target_modules(model: nn.Module, patterns: str | Sequence[str] | None = None,
                        embeddings: bool = False, lm_head: bool | None = None) -> dict[str, nn.Module]:
    """Map ``module_name -> module`` of the target projections, with ``embeddings`` the token embedding, and with
    ``lm_head`` (None: as ``embeddings``) an untied LM head, in model order."""
    from transformers.modeling_utils import PreTrainedModel  # the loader imports us while defining it

    output_embeddings = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    lm_head = embeddings if lm_head is None else lm_head
    linear = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, TARGET_MODULE_TYPES) and module is not output_embeddings
    }
    if patterns is None:
        found = {name: m for name, m in linear.items() if _in_repeated_block(name)}
    else:
        named = _named_embeddings(model, patterns) if isinstance(model, PreTrainedModel) else {}
        embeddings = embeddings or "embedding" in named.values()
        lm_head = lm_head or "head" in named.values()
        if not isinstance(patterns, str):
            unmatched = [p for p in patterns if not any(_matches(name, [p]) for name in [*linear, *named])]
            if unmatched:
                raise TargetNotFoundError(_no_match_message(unmatched, linear))
        found = {name: m for name, m in linear.items() if _matches(name, patterns)}
    if not found:
        raise TargetNotFoundError(_no_match_message(patterns, linear))
    extra = _embedding_modules(model, embeddings, lm_head) if embeddings or lm_head else {}
    if not extra:
        return found
    return {name: module for name, module in model.named_modules() if name in found or id(module) in extra}


def _named_embeddings(model, patterns: Sequence[str]) -> dict[str, str]:
    """The token embedding and the LM head when a list of patterns names them (as a run records its targets):
    ``module_name -> "embedding" | "head"``."""
    if isinstance(patterns, str):
        return {}
    kinds = {id(model.get_input_embeddings()): "embedding", id(model.get_output_embeddings()): "head"}
    return {name: kinds[id(module)] for name, module in model.named_modules()
            if id(module) in kinds and _matches(name, patterns)}


def _no_match_message(patterns, linear: dict[str, nn.Module]) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
    return (
        f"`target_modules` {patterns!r} matches no linear module of this model. "
        f"Linear module names here end in: {suffixes}. Use some of those, or leave `target_modules` unset for "
        "every projection inside the transformer blocks."
    )
