"""Flag helpers shared by the commands: snake_case names (the Python argument's), with a dashed alias.

argparse %-formats every help string (``%(default)s``, ``%(prog)s``), so a bare ``%`` in a help text ("6.4% of
...") crashes ``--help``; ``escape_help`` doubles such signs, and ``escape_parser_help`` applies it to every help
string of a parser and of its subcommands, so that no help text can bring the crash back.
"""

from __future__ import annotations

import argparse
import re

# `%%` (already escaped) and `%(name)` (a format argparse fills in) stay; every other `%` is doubled
_BARE_PERCENT = re.compile(r"%%|%(?!\()")


def escape_help(text: str | None) -> str | None:
    """``text`` with every bare ``%`` doubled, so that argparse's %-formatting prints it as written;
    ``%%`` and ``%(name)s`` are kept."""
    if not text:
        return text
    return _BARE_PERCENT.sub(lambda match: "%%" if match.group(0) == "%" else match.group(0), text)


def escape_parser_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Escape the help strings of every argument of ``parser`` and of its subcommands (idempotent); returns it."""
    seen = set()

    def walk(current):
        if id(current) in seen:  # an alias maps to the same parser
            return
        seen.add(id(current))
        for action in current._actions:
            if isinstance(action.help, str):
                action.help = escape_help(action.help)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:  # the one-line help of each command
                    choice.help = escape_help(choice.help)
                for sub in action.choices.values():
                    walk(sub)

    walk(parser)
    return parser


def option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--name`` and ``--name-with-dashes`` for the Python argument ``name``. A bare ``%`` in ``help`` is escaped,
    and ``(default: ...)`` is added to it when the flag has a default its help does not already describe."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    help_text = escape_help(kwargs.get("help"))
    default = kwargs.get("default")
    shows_default = (default is not None and default is not argparse.SUPPRESS and not kwargs.get("required")
                     and kwargs.get("action") not in ("store_true", "store_false", "store_const", "count")
                     and "default" not in (help_text or "").lower())
    if shows_default:
        help_text = f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"
    if help_text is not None:
        kwargs["help"] = help_text
    parser.add_argument(*flags, dest=name, **kwargs)


def boolean(text: str) -> bool:
    """``true``/``false`` (also yes/no, 1/0), as transformers' parser reads booleans."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
