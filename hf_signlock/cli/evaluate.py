"""``hf-signlock eval DIR`` (alias ``evaluate``): held-out perplexity of a model folder (a run or an export) -> ``DIR/eval.json``."""

from __future__ import annotations

import os

from .options import option


def add_parser(commands) -> None:
    """Add the ``eval`` command (alias ``evaluate``) to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser("eval", aliases=["evaluate"], help="Held-out perplexity of a model folder (run or export).")
    parser.add_argument("folder")
    option(parser, "config", default=None, help="recipe whose data settings to use (default: the run's)")
    option(parser, "batch_size", type=int, default=16)


def run(args, rest) -> int:
    """Run ``hf-signlock eval``; returns the exit code."""
    from ..constants import EVAL_NAME
    from ..evaluation.perplexity import evaluate_folder

    data_args = None
    if args.config:
        from ..training.recipe import parse_recipe

        data_args = parse_recipe(args.config, ["--output_dir", args.folder])[1]
    result = evaluate_folder(args.folder, data_args, batch_size=args.batch_size)
    print(f"{args.folder}: perplexity {result['perplexity']:.3f} over {result['tokens']:,} held-out tokens of "
          f"{result['dataset']} (written to {os.path.join(args.folder, EVAL_NAME)})")
    return 0
