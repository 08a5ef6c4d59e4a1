"""``hf-signlock`` command line.

    hf-signlock train --config RECIPE [--field value ...]
    hf-signlock export RUN_DIR OUT_DIR [--codec vq --bits-per-weight 0.5] [--sign-source packed] [--keep-compressed]
    hf-signlock inspect DIR
    hf-signlock push DIR REPO_ID [--private]
    hf-signlock evaluate DIR [--config RECIPE]
"""

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


def _export(args) -> int:
    from .export import export_run

    report = export_run(args.run_dir, args.out_dir, codec=args.codec, bits_per_weight=args.bits_per_weight,
                        codec_params=json.loads(args.codec_params) if args.codec_params else None,
                        sign_source=args.sign_source, dequantize=not args.keep_compressed,
                        refine_steps=args.refine_steps, refine_learning_rate=args.refine_lr,
                        refine_loss=args.refine_loss)
    total = report["total"]
    print(f"{args.out_dir}: {report['bpw']:.4f} bits per target weight ({total['weights']:,} weights, "
          f"{total['flips']:,} flips, signs {report['sign_source']}, codec {report['codec']})")
    return 0


def _evaluate(folder: str, config: str | None) -> int:
    from .evaluate import EVAL_NAME, evaluate_folder

    data_args = None
    if config:
        from .recipe import parse_recipe

        data_args = parse_recipe(config, ["--output_dir", folder])[1]
    result = evaluate_folder(folder, data_args)
    print(f"{folder}: perplexity {result['perplexity']:.3f} over {result['tokens']:,} held-out tokens "
          f"(written to {os.path.join(folder, EVAL_NAME)})")
    return 0


def _inspect(folder: str) -> int:
    from .bpw import BPW_NAME, checkpoint_bytes

    path = os.path.join(folder, BPW_NAME)
    if not os.path.exists(path):
        raise SignLockError(f"{folder} has no {BPW_NAME}: it is not a SignLock export (make one with `hf-signlock "
                            "export RUN_DIR OUT_DIR`).")
    with open(path) as handle:
        report = json.load(handle)
    rows = [("layer", "weights", "flips", "flip bits", "magnitude bits", "other bits", "bpw")]
    for name, layer in [*report["layers"].items(), ("total", report["total"])]:
        rows.append((name, f"{layer['weights']:,}", f"{layer['flips']:,}", f"{layer['flip_bits']:,}",
                     f"{layer['magnitude_bits']:,}", f"{layer['other_bits']:,}",
                     f"{layer['total_bits'] / layer['weights']:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"\nsigns: {report['sign_source']}, codec: {report['codec']} {report.get('codec_params') or ''}")
    print(f"bits per target weight: {report['bpw']:.4f}; checkpoint on disk: {checkpoint_bytes(folder):,} bytes")
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
    export = commands.add_parser("export", help="Compress a trained model folder into a sub-bit SignLock checkpoint.")
    export.add_argument("run_dir", help="a training run's output folder (model, tokenizer, signlock_stats.json)")
    export.add_argument("out_dir")
    export.add_argument("--codec", default="vq", help="magnitude codec: vq (default), lowrank, scale, exact (lossless)")
    export.add_argument("--bits-per-weight", type=float, default=None,
                        help="total budget per target weight (signs + magnitudes + tables); the codec fits it")
    export.add_argument("--codec-params", default=None, help='JSON, e.g. \'{"bits": 8, "group": 16}\' for vq')
    export.add_argument("--sign-source", default=None, choices=["seed", "template", "packed"],
                        help="override the run's sign source (packed: explicit 1-bit signs)")
    export.add_argument("--refine-steps", type=int, default=0,
                        help="train the codec's tables on the run's training text for N steps, signs fixed")
    export.add_argument("--refine-lr", type=float, default=3e-3)
    export.add_argument("--refine-loss", default="lm", choices=["lm", "teacher"],
                        help="refinement objective: the LM loss, or KL from the trained dense model (teacher)")
    export.add_argument("--keep-compressed", action="store_true",
                        help="load as compressed modules that rebuild their weight when used, not dense Linear")
    push = commands.add_parser("push", help="Upload an export (model, tokenizer, bpw.json) with its model card.")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    evaluate = commands.add_parser("evaluate", help="Held-out perplexity of a model folder (run or export).")
    evaluate.add_argument("folder")
    evaluate.add_argument("--config", default=None, help="recipe whose data settings to use (default: the run's)")
    inspect = commands.add_parser("inspect", help="Bits per weight of a SignLock export, per layer and in total.")
    inspect.add_argument("folder")
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("export", "inspect", "push", "evaluate"):
        try:
            if args.command == "evaluate":
                return _evaluate(args.folder, args.config)
            if args.command == "push":
                from .hub import push

                print(push(args.folder, args.repo_id, private=args.private or None))
                return 0
            return _export(args) if args.command == "export" else _inspect(args.folder)
        except SignLockError as error:
            print(f"hf-signlock: error: {error}", file=sys.stderr)
            return 2
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
