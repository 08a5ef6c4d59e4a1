"""``hf-signlock sweep``: (being built for issue 10)."""

from __future__ import annotations


def add_parser(commands) -> None:
    """Add the ``sweep`` command to the ``hf-signlock`` subparsers."""
    commands.add_parser("sweep", help="(not yet available)")


def run(args, rest) -> int:
    """Run ``hf-signlock sweep``; returns the exit code."""
    raise NotImplementedError("sweep")
