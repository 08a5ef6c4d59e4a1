"""``hf-signlock analyze MODEL [--reference REF] [--output DIR]``: sign statistics of a checkpoint.

Per target layer and in total: flip rate against the reference signs, near-zero fraction, the spectral KS test of
sign(W) against i.i.d. random signs, relative rank-r errors of sign(W), of random signs and of |W|, and the
crossing-count histogram when MODEL carries training statistics. With ``--output DIR``: ``DIR/analysis.json``,
``DIR/analysis.md`` and PNG figures. See ``hf_signlock/evaluation/analyze.py``.
"""

from __future__ import annotations

import argparse

from .options import option


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32,128, got {text!r}")
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be positive integers, got {text!r}")
    return ranks


def _patterns(text: str) -> str | list[str]:
    """``q_proj,v_proj`` -> a list of names; a single entry stays a regular expression, as in PEFT."""
    parts = [part for part in text.split(",") if part]
    return parts if len(parts) > 1 else text


def add_parser(commands) -> None:
    """Add the ``analyze`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser(
        "analyze", help="Sign statistics of a checkpoint: flip rate, near-zero weights, spectra vs random signs.",
        description="Flip rate, near-zero fraction, spectral KS test of sign(W) against an i.i.d. Rademacher matrix and "
                    "rank-r errors, per target layer and in total; writes analysis.json, analysis.md and figures with "
                    "--output.")
    parser.add_argument("model", help="a local folder or Hub id: a run, an export, or any causal LM")
    option(parser, "reference", default=None,
           help="where the reference signs come from: seed:N (or N; template:N[:RANK]), an initial checkpoint, a base "
                "model or a SignLock export (folder or Hub id). Default: what MODEL records (none for a plain model)")
    option(parser, "output", default=None, help="folder for analysis.json, analysis.md and the PNG figures")
    # defaults live in hf_signlock.evaluation.analyze (not imported here: every command builds this parser)
    option(parser, "ranks", type=_ranks, default=None,
           help="ranks r of the rank-r errors, comma-separated (default 1,8,32,128)")
    option(parser, "sample", type=int, default=None,
           help="give the spectral test to about this many target layers, every kind of projection represented, spread "
                "over the blocks (default: all)")
    option(parser, "target_modules", type=_patterns, default=None,
           help="layers to analyse: comma-separated names, or one regular expression (default: what MODEL records, "
                "else every projection inside the transformer blocks)")
    option(parser, "near_zero_band", type=float, default=None,
           help="near zero means |w| < band x scale (default 0.1, the trainer's)")
    option(parser, "near_zero_scale", choices=("auto", "init", "layer"), default="auto",
           help="scale of the band: the layer's init std, its own std, or auto (init std for runs and exports, else "
                "the layer's std)")
    option(parser, "seed", type=int, default=0, help="seed of the Rademacher baseline matrices")
    option(parser, "workers", type=int, default=None,
           help="threads computing the SVDs, one layer each (default: torch's thread count)")
    option(parser, "no_figures", action="store_true", help="write analysis.json and analysis.md without figures")


def run(args, rest) -> int:
    """Run ``hf-signlock analyze``; returns the exit code."""
    import os

    from ..evaluation.analyze import ANALYSIS_JSON, analyze

    given = {"ranks": args.ranks, "near_zero_band": args.near_zero_band}
    result = analyze(args.model, args.reference, args.output, sample=args.sample, target_modules=args.target_modules,
                     near_zero_scale=args.near_zero_scale, seed=args.seed, figures=not args.no_figures, workers=args.workers,
                     **{key: value for key, value in given.items() if value is not None})
    total = result["total"]
    print(f"{args.model}: {total['layers']} target layers, {total['weights']:,} weights "
          f"(reference: {result['reference'] or 'none'})")
    if total["flip_rate"] is not None:
        print(f"  flip rate {total['flip_rate']:.4g} ({total['flips']:,} flips)")
    print(f"  near-zero fraction {total['near_zero_fraction']:.4g} ({result['settings']['near_zero_scale']})")
    if total.get("layers_tested"):
        print(f"  spectrum of sign(W) vs random signs: {total['layers_rejected']} of {total['layers_tested']} layers "
              f"reject at p < {result['settings']['ks_alpha']} (median p {total['ks_pvalue_median']:.3g}, mean KS "
              f"{total['ks_statistic_mean']:.3g}); pooled KS {total['pooled_ks_statistic']:.3g}")
        ranks = result["settings"]["ranks"]
        for kind, label in (("sign", "sign(W)"), ("rademacher", "random signs"), ("abs", "|W|")):
            errors = ", ".join(f"r={r}: {e:.3f}" for r, e in zip(ranks, total["rank_error"][kind]))
            print(f"  rank-r error of {label:12s} {errors}")
    if result.get("training") and result["training"]["geometric_tail_ratio"] is not None:
        print(f"  crossing counts: geometric tail ratio {result['training']['geometric_tail_ratio']:.3g}")
    if args.output:
        print(f"  written to {os.path.join(args.output, ANALYSIS_JSON)}, analysis.md and {len(result['figures'])} figures")
    return 0
