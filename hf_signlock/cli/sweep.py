"""``hf-signlock sweep --config recipes/sweep.yaml``: train, export, evaluate and plot the method's ablation grid.

Finished points are skipped, so an interrupted sweep resumes where it stopped; ``--dry_run`` lists the points and
which are done. Writes ``sweep_results.json``, ``sweep.md`` and the figures into the output folder, and the results
document (``results_doc`` in the sweep file). See :mod:`hf_signlock.evaluation.sweep`.
"""

from __future__ import annotations

import sys

from .options import boolean, option


def add_parser(commands) -> None:
    """Add the ``sweep`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser(
        "sweep", help="Train, export, evaluate and plot the sign lock-in ablation grid (resumable).",
        description="Baseline, gap only, drift only and gap + drift over a grid of lambda and margin, exported at "
        "several budgets, evaluated, plotted, and the results document written. Finished points are skipped.")
    option(parser, "config", required=True, help="sweep YAML file, e.g. recipes/sweep.yaml")
    option(parser, "output_dir", default=None, help="where the points and results go (default: the file's)")
    option(parser, "dry_run", nargs="?", const=True, default=False, type=boolean,
           help="list the points and which are done, compute nothing")


def run(args, rest) -> int:
    """Run ``hf-signlock sweep``; returns the exit code (1 when some point failed)."""
    from ..evaluation.sweep import Sweep, SweepPointError, describe_status, read_sweep

    sweep = Sweep(read_sweep(args.config, output_dir=args.output_dir))
    if args.dry_run:
        print(describe_status(sweep))
        return 0
    try:
        results = sweep.run()
    except SweepPointError as error:
        print(f"hf-signlock sweep: {error}", file=sys.stderr)
        return 1
    timing = results["timing"]
    print(f"{timing['computed']} points computed, {timing['skipped']} already done, in "
          f"{timing['this_call_s'] / 60:.1f} min; results in {sweep.root} (sweep_results.json, sweep.md, figures), "
          f"document {sweep.spec.doc_path()}")
    return 0
