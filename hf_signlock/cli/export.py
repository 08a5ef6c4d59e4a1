"""``hf-signlock export RUN_DIR OUT_DIR``: compress a trained model folder into a sub-bit SignLock checkpoint.

The flags are ``export_run``'s arguments, with its defaults: vq at 1 bit per weight, no refinement; with a budget
that leaves the magnitudes 2 bits a weight or more, the calibrated ``signmag`` codec.
"""

from __future__ import annotations

import json

from .options import boolean, option


def add_parser(commands) -> None:
    """Add the ``export`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser("export", help="Compress a trained model folder into a sub-bit SignLock checkpoint.")
    parser.add_argument("run_dir", help="a training run's output folder (model, tokenizer, signlock_stats.json)")
    parser.add_argument("out_dir")
    option(parser, "codec", default=None, choices=["vq", "signmag", "lowrank", "scale", "exact"],
           help="magnitude codec: signmag (calibrated levels; the default from 2 magnitude bits a weight), vq "
                "(codebooks; the default below), lowrank, scale, exact (lossless)")
    option(parser, "bits_per_weight", type=float, default=None,
           help="budget per target weight, everything a target layer adds counted (default: 1.0 for vq and lowrank)")
    option(parser, "bits_per_parameter", type=float, default=None,
           help="budget of the whole file instead: every byte of the weight files and config over the model's "
                "parameters (the dense tensors and config paid first, the rest shared by the target weights)")
    option(parser, "target_embeddings", type=boolean, default=None,
           help="compress the token embedding and an untied LM head too (default: when the run trained them as "
                "targets, for a fine-tune stored against its base, and for a model without a run)")
    option(parser, "codec_params", type=json.loads, default=None, help='JSON, e.g. \'{"bits": 8, "group": 16}\'')
    option(parser, "sign_source", default=None, choices=["seed", "template", "packed", "base"],
           help="override the run's sign source (packed: explicit 1-bit signs; base: flips against --base_model)")
    option(parser, "base_model", default=None,
           help="store the signs as flips against this model's (folder, Hub id or sign pack): a fine-tune's base "
                "(default: the model a captured run records having started from)")
    option(parser, "base_revision", default=None, help="Hub revision of --base_model (default: main)")
    option(parser, "calibration_dataset", default=None,
           help="calibration text for signmag, as `eval --dataset` (default: the run's training text, else the "
                "built-in corpus)")
    option(parser, "calibration_split", default="train", help="split of the calibration text")
    option(parser, "calibration_samples", type=int, default=64, help="windows of calibration text (0: none)")
    option(parser, "calibration_length", type=int, default=256, help="tokens per calibration window")
    option(parser, "dequantize", type=boolean, default=None,
           help="what from_pretrained gives by default: true dense modules (the default), false compressed ones")
    option(parser, "refine_steps", type=int, default=0,
           help="train the codec tables on the run's training text for N steps, signs fixed")
    option(parser, "refine_learning_rate", type=float, default=3e-3, help="AdamW learning rate of the refinement")
    option(parser, "refine_loss", default="lm", choices=["lm", "teacher"],
           help="refinement objective: the LM loss, or KL from the trained dense model (teacher)")
    option(parser, "overwrite", type=boolean, default=False, nargs="?", const=True,
           help="replace OUT_DIR when it holds anything (or is the run folder itself); the export is written beside "
                "it and moved into place once complete")
    option(parser, "dtype", default=None, choices=["float32", "bfloat16", "float16"],
           help="dtype of the tensors that stay dense (norms, biases; embeddings that are not targets); default "
                "bfloat16")


def summary_line(folder, report: dict) -> str:
    """The whole file first (bytes, bits per parameter, the dense bf16 file beside it), then the target layers."""
    total, checkpoint = report["total"], report["checkpoint"]
    flips = f"{total['flips']:,} flips" if report["sign_source"] != "packed" else "packed signs"
    return (f"{folder}: {checkpoint['bytes']:,} bytes, {checkpoint['bits_per_parameter']:.3f} bits per parameter "
            f"({checkpoint['parameters']:,} parameters; dense bf16: {checkpoint['dense_bf16_bytes']:,} bytes, "
            f"{checkpoint['bytes'] / checkpoint['dense_bf16_bytes']:.3f}x); target layers {report['bpw']:.4f} bits "
            f"per weight ({total['weights']:,} weights, {flips}, codec {report['codec']})")


def run(args, rest) -> int:
    """Run ``hf-signlock export``; returns the exit code."""
    from ..quantization.calibration import CalibrationArguments
    from ..quantization.export import export_run

    report = export_run(args.run_dir, args.out_dir, codec=args.codec, bits_per_weight=args.bits_per_weight,
                        bits_per_parameter=args.bits_per_parameter, target_embeddings=args.target_embeddings,
                        codec_params=args.codec_params, sign_source=args.sign_source, dequantize=args.dequantize,
                        refine_steps=args.refine_steps, refine_learning_rate=args.refine_learning_rate,
                        refine_loss=args.refine_loss, dtype=args.dtype, base_model=args.base_model,
                        base_revision=args.base_revision,
                        calibration=CalibrationArguments(args.calibration_dataset, split=args.calibration_split,
                                                         samples=args.calibration_samples,
                                                         sequence_length=args.calibration_length),
                        overwrite=args.overwrite)
    print(summary_line(args.out_dir, report))
    return 0
