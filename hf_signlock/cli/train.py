"""``hf-signlock train --config RECIPE [--field value ...]``: train a causal LM from a YAML recipe.

A recipe is required to build a model from scratch: the dataclass defaults alone describe no coherent model (llama's
own MLP width beside a width-128 model), so ``hf-signlock train`` without ``--config`` (and without
``--model_name_or_path``) stops and names ``recipes/quickstart.yaml``. Every error ends by pointing at
``hf-signlock train --help``, which lists each field with its default.
"""

from __future__ import annotations

import json
import os

from ..errors import RecipeError, SignLockError

HELP = "Train a causal LM with seeded gap init, outward drift and flip tracking."
QUICKSTART_RECIPE = "recipes/quickstart.yaml"
SEE_HELP = "See `hf-signlock train --help`."


def add_parser(commands) -> None:
    """Add the ``train`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser(
        "train", help=HELP, add_help=False,
        description="Flags after the recipe override its keys; any field of ModelArguments, DataArguments or "
        "SignLockTrainingArguments is a flag (e.g. --max_steps 100).",
    )
    parser.add_argument("--config", help=f"YAML recipe, e.g. {QUICKSTART_RECIPE}")
    parser.add_argument("-h", "--help", action="store_true")


def _pointing_to_help(error: Exception) -> SignLockError:
    """``error`` as a typed error whose message ends by pointing at ``hf-signlock train --help``."""
    message = str(error).rstrip()
    if "--help" not in message:
        message = f"{message}{'' if message.endswith('.') else '.'} {SEE_HELP}"
    if isinstance(error, SignLockError):
        try:
            return type(error)(message)
        except TypeError:  # a subclass with another signature: keep its message's meaning in the base class
            return RecipeError(message)
    return RecipeError(message)  # transformers' own checks of TrainingArguments raise ValueError


def parse_train_arguments(config: str | None, rest: list[str]):
    """(ModelArguments, DataArguments, SignLockTrainingArguments) of ``hf-signlock train``; a from-scratch model
    without a recipe is refused (``RecipeError`` naming ``--config recipes/quickstart.yaml``)."""
    from ..training.recipe import parse_recipe

    try:
        model_args, data_args, training_args = parse_recipe(config, rest)
    except (SignLockError, ValueError) as error:
        raise _pointing_to_help(error) from None
    if config is None and model_args.model_name_or_path is None:
        raise RecipeError(
            "`hf-signlock train` needs a recipe to build a model from scratch: pass `--config "
            f"{QUICKSTART_RECIPE}` (a small Llama on the built-in corpus) or a YAML file of your own, and override "
            "its keys with flags after it. The dataclass defaults alone are no coherent model (hidden_size 128 with "
            f"the architecture's own intermediate_size). To fine-tune instead, pass --model_name_or_path. {SEE_HELP}"
        )
    return model_args, data_args, training_args


def run(args, rest: list[str]) -> int:
    """Run ``hf-signlock train``; returns the exit code."""
    from ..constants import STATS_NAME
    from ..training.recipe import make_parser
    from ..training.run import run_training

    if args.help:
        print("usage: hf-signlock train --config RECIPE [--field value ...]\n")
        make_parser().print_help()
        return 0
    model_args, data_args, training_args = parse_train_arguments(args.config, rest)
    try:
        trainer = run_training(model_args, data_args, training_args)
    except SignLockError as error:
        raise _pointing_to_help(error) from None
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, STATS_NAME)) as handle:
            stats = json.load(handle)
        print(
            f"\nflip rate {stats['flip_rate']:.3g} ({stats['flips']} of {stats['target_weights']} target weights), "
            f"eval perplexity {stats['eval_perplexity']:.3f}, geometric tail ratio {stats['geometric_tail_ratio']}\n"
            f"model, tokenizer and {STATS_NAME} in {training_args.output_dir}"
        )
    return 0
