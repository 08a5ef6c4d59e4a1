"""``hf-signlock`` command line: one module per command, flags spelled like the Python arguments they set.

    hf-signlock train --config RECIPE [--field value ...]
    hf-signlock export RUN_DIR OUT_DIR [--codec vq] [--bits_per_weight 1.0] [--refine_steps 200] ...
    hf-signlock eval MODEL [--dataset DATASET] [--window N --stride N] [--reference REF]  (alias: evaluate)
    hf-signlock analyze MODEL [--reference REF] [--output DIR]
    hf-signlock sweep --config recipes/sweep.yaml
    hf-signlock inspect DIR
    hf-signlock push DIR REPO_ID [--private] [--revision BRANCH] [--create_pr] ...
    hf-signlock signs BASE OUT_DIR [--revision REV] [--target_modules ...]
    hf-signlock --version

Every flag is also accepted with dashes (``--bits-per-weight``), as transformers' own parser does; each command's
``--help`` shows the defaults.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import SignLockError
from . import analyze, evaluate, export, inspect, push, signs, sweep, train
from .options import escape_parser_help

COMMANDS = {"train": train, "export": export, "eval": evaluate, "evaluate": evaluate, "analyze": analyze, "sweep": sweep,
            "inspect": inspect, "push": push, "signs": signs}


def package_version() -> str:
    """The installed version of hf-signlock (its distribution's metadata; the package's own when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-signlock")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def make_parser() -> argparse.ArgumentParser:
    """The ``hf-signlock`` parser with every command (help strings escaped for argparse's %-formatting)."""
    parser = argparse.ArgumentParser(prog="hf-signlock", description="Sign lock-in for Hugging Face Transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):  # each once: `evaluate` is an alias of `eval`
        module.add_parser(commands)
    return escape_parser_help(parser)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-signlock``: runs one command; typed errors print one line and exit with 2."""
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return COMMANDS[args.command].run(args, rest)
    except SignLockError as error:
        print(f"hf-signlock: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
