"""``hf-signlock analyze``: (being built for issue 10)."""

from __future__ import annotations


def add_parser(commands) -> None:
    """Add the ``analyze`` command to the ``hf-signlock`` subparsers."""
    commands.add_parser("analyze", help="(not yet available)")


def run(args, rest) -> int:
    """Run ``hf-signlock analyze``; returns the exit code."""
    raise NotImplementedError("analyze")
