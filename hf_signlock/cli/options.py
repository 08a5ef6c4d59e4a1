"""Flag helpers shared by the commands: snake_case names (the Python argument's), with a dashed alias."""

from __future__ import annotations

import argparse


def option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--name`` and ``--name-with-dashes`` for the Python argument ``name``."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **kwargs)


def boolean(text: str) -> bool:
    """``true``/``false`` (also yes/no, 1/0), as transformers' parser reads booleans."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
