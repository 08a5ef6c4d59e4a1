"""YAML recipes: keys are the fields of the argument dataclasses, command-line flags override them.

A recipe is turned into command-line strings (``key: value`` -> ``--key value``) placed before the user's own flags,
so that argparse type-checks every value and the last occurrence, the user's, wins. Unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..data import DataArguments
from ..errors import RecipeError
from .arguments import SignLockTrainingArguments
from .run import ModelArguments

ARGUMENT_CLASSES = (ModelArguments, DataArguments, SignLockTrainingArguments)


def _field_names() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def read_recipe(path: str | Path) -> dict:
    """The mapping of a YAML recipe; unknown keys are refused with the closest known field named."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe {str(path)!r} does not exist. Pass an existing YAML file to --config.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"Recipe {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe {str(path)!r} must be a mapping of `field: value`, got {type(values).__name__}.")
    known = _field_names()
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecipeError(
            f"Recipe {str(path)!r} has unknown keys: {', '.join(hints)}. Keys must be fields of ModelArguments, "
            "DataArguments or SignLockTrainingArguments (see `hf-signlock train --help`)."
        )
    return values


def _as_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if value is None:
            continue  # set through parser defaults: argparse has no spelling for None
        items = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in items)]
    return flags


class _RecipeParser(HfArgumentParser):
    def error(self, message):  # argparse would print usage and exit; a library raises
        raise RecipeError(f"{message}. Fix the recipe key or flag (see `hf-signlock train --help`).")


def make_parser() -> HfArgumentParser:
    """The parser of recipes and ``hf-signlock train`` flags: the fields of the three argument dataclasses."""
    return _RecipeParser(ARGUMENT_CLASSES)


def parse_recipe(config: str | Path | None = None, argv: Sequence[str] = ()):
    """(ModelArguments, DataArguments, SignLockTrainingArguments) from a recipe and command-line flags."""
    values = read_recipe(config) if config is not None else {}
    parser = make_parser()
    parser.set_defaults(**{k: None for k, v in values.items() if v is None})
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=[*_as_flags(values), *argv], return_remaining_strings=True
    )
    if rest:
        raise RecipeError(f"Unknown command-line arguments: {rest}. See `hf-signlock train --help`.")
    return model_args, data_args, training_args
