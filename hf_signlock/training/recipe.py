"""YAML recipes: keys are the fields of the argument dataclasses, command-line flags override them.

A recipe is turned into command-line strings (``key: value`` -> ``--key value``) placed before the user's own flags,
so that argparse type-checks every value and the last occurrence, the user's, wins. Unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser

from ..cli.options import escape_parser_help
from ..data import DataArguments
from ..errors import RecipeError
from ..yaml_mapping import read_yaml_mapping
from .arguments import SignLockTrainingArguments
from .run import ModelArguments

ARGUMENT_CLASSES = (ModelArguments, DataArguments, SignLockTrainingArguments)


def field_names() -> set[str]:
    """Every key a recipe may set: the init fields of the argument dataclasses."""
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def read_recipe(path: str | Path) -> dict:
    """The mapping of a YAML recipe; unknown keys are refused with the closest known field named."""
    return read_yaml_mapping(path, "Recipe", "`field: value`", field_names(),
                             "Keys must be fields of ModelArguments, DataArguments or SignLockTrainingArguments (see "
                             "`hf-signlock train --help`).")


def as_flags(values: dict) -> list[str]:
    """Recipe values as command-line strings (``key: value`` -> ``--key value``; lists spread, booleans lowercase)."""
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
    """The parser of recipes and ``hf-signlock train`` flags: the fields of the three argument dataclasses (their
    help texts escaped for argparse's %-formatting, so that ``--help`` prints a "6.4%" as written)."""
    return escape_parser_help(_RecipeParser(ARGUMENT_CLASSES))


def parse_recipe(config: str | Path | None = None, argv: Sequence[str] = ()):
    """(ModelArguments, DataArguments, SignLockTrainingArguments) from a recipe and command-line flags."""
    values = read_recipe(config) if config is not None else {}
    parser = make_parser()
    parser.set_defaults(**{k: None for k, v in values.items() if v is None})
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=[*as_flags(values), *argv], return_remaining_strings=True
    )
    if rest:
        raise RecipeError(f"Unknown command-line arguments: {rest}. See `hf-signlock train --help`.")
    return model_args, data_args, training_args
