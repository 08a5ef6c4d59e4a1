"""``hf-signlock train --config RECIPE [--field value ...]``: train a causal LM from a YAML recipe."""

from __future__ import annotations

import json
import os

HELP = "Train a causal LM with seeded gap init, outward drift and flip tracking."


def add_parser(commands) -> None:
    """Add the ``train`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser(
        "train", help=HELP, add_help=False,
        description="Flags after the recipe override its keys; any field of ModelArguments, DataArguments or "
        "SignLockTrainingArguments is a flag (e.g. --max_steps 100).",
    )
    parser.add_argument("--config", help="YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("-h", "--help", action="store_true")


def run(args, rest: list[str]) -> int:
    """Run ``hf-signlock train``; returns the exit code."""
    from ..constants import STATS_NAME
    from ..training.recipe import make_parser, parse_recipe
    from ..training.run import run_training

    if args.help:
        print("usage: hf-signlock train [--config RECIPE] [--field value ...]\n")
        make_parser().print_help()
        return 0
    model_args, data_args, training_args = parse_recipe(args.config, rest)
    trainer = run_training(model_args, data_args, training_args)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, STATS_NAME)) as handle:
            stats = json.load(handle)
        print(
            f"\nflip rate {stats['flip_rate']:.3g} ({stats['flips']} of {stats['target_weights']} target weights), "
            f"eval perplexity {stats['eval_perplexity']:.3f}, geometric tail ratio {stats['geometric_tail_ratio']}\n"
            f"model, tokenizer and {STATS_NAME} in {training_args.output_dir}"
        )
    return 0
