"""``hf-signlock`` command line: ``hf-signlock train --config RECIPE [--field value ...]``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import SignLockError


def _train(config: str | None, rest: list[str]) -> int:
    from .recipe import parse_recipe
    from .train import run_training
    from .trainer import STATS_NAME

    model_args, data_args, training_args = parse_recipe(config, rest)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-signlock", description="Sign lock-in for Hugging Face Transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="Train a causal LM with seeded gap init, outward drift and flip tracking.",
        description="Flags after the recipe override its keys; any field of ModelArguments, DataArguments or "
        "SignLockTrainingArguments is a flag (e.g. --max_steps 100).",
        add_help=False,
    )
    train.add_argument("--config", help="YAML recipe, e.g. recipes/quickstart.yaml")
    train.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        if args.help:
            from .recipe import make_parser

            train.print_help()
            make_parser().print_help()
            return 0
        try:
            return _train(args.config, rest)
        except SignLockError as error:
            print(f"hf-signlock: error: {error}", file=sys.stderr)
            return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
