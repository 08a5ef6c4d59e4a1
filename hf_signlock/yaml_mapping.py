"""YAML files of settings (training recipes, sweep files): read as a mapping, unknown keys named with a suggestion."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import yaml

from .errors import RecipeError


def did_you_mean(value, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``value``, or an empty string."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_yaml_mapping(path: str | Path, what: str, entry: str, known: Iterable[str], fix: str) -> dict:
    """The mapping in the YAML file ``path`` (``what`` names it in errors: "Recipe", "Sweep file"); a missing file,
    invalid YAML, anything but a mapping of ``entry`` (e.g. "`key: value`") or a key outside ``known`` is a
    ``RecipeError``. ``fix`` ends the unknown-keys message: where the known keys are listed."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} {str(path)!r} does not exist. Pass an existing YAML file to --config.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{what} {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{what} {str(path)!r} must be a mapping of {entry}, got {type(values).__name__}.")
    known = list(known)
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        hints = ", ".join(f"{key!r}{did_you_mean(key, known)}" for key in unknown)
        raise RecipeError(f"{what} {str(path)!r} has unknown keys: {hints}. {fix}")
    return values
