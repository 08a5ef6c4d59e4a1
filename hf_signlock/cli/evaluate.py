"""``hf-signlock eval MODEL`` (alias ``evaluate``): sliding-window perplexity of a model on any text.

    hf-signlock eval MODEL [--dataset DATASET] [--window 1024 --stride 512] [--reference REF] [--output FILE.json]

MODEL is a local folder or a Hub id, dense or SignLock. DATASET is a text/json/csv/parquet file, a folder, or a
``datasets`` name; by default the held-out split of the run's own data. The result is printed; ``--output
FILE.json`` also writes it, with ``FILE.md``, a short report. Nothing is written without it: MODEL's own
``eval.json``, the perplexity its model card shows, changes only when asked (``--output MODEL/eval.json``). Several
processes (``torchrun --nproc_per_node N -m hf_signlock eval ...`` or ``accelerate launch``) share the windows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .options import option


def add_parser(commands) -> None:
    """Add the ``eval`` command (alias ``evaluate``) to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser("eval", aliases=["evaluate"],
                                 help="Perplexity of a model (folder or Hub id, dense or SignLock) on any text.")
    parser.add_argument("model", metavar="MODEL", help="a local model folder or a Hub id")
    option(parser, "dataset", default=None,
           help="text/json/csv/parquet file, folder, or `datasets` name (default: the run's held-out split)")
    option(parser, "dataset_config_name", default=None, help="config of a `datasets` dataset (e.g. wikitext-2-raw-v1)")
    option(parser, "split", default=None, help="split to score (default: test, else validation, else train)")
    option(parser, "text_column", default=None, help="column holding the text (default: text)")
    option(parser, "window", type=int, default=None,
           help="tokens per forward pass (default: the model's context, at most 1024)")
    option(parser, "stride", type=int, default=None, help="tokens between window starts (default: window // 2)")
    option(parser, "batch_size", type=int, default=8, help="windows per forward pass")
    option(parser, "max_tokens", type=int, default=None, help="score only the first N tokens (quick runs)")
    option(parser, "reference", default=None,
           help="signs to count flips against (a run, an export, a model); default: what the model records")
    option(parser, "output", default=None,
           help="write the result to FILE.json and a report to FILE.md (default: print only; MODEL/eval.json is "
                "what an export's model card shows)")
    option(parser, "config", default=None, help="recipe whose data settings give the default text (default: the run's)")
    option(parser, "base_model", default=None,
           help="for an export whose signs are stored against a base model: where that base is (a folder, a Hub id "
                "or a sign pack); a path the export's own config names is followed only inside its folder")
    option(parser, "recorded_data", action="store_true",
           help="read the local data files MODEL's recorded training settings name outside its folder (refused "
                "otherwise: a checkpoint's files are input)")


def _init_distributed():
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment; True when
    this call created it (and the caller destroys it at the end)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return None
    if torch.distributed.is_initialized():
        return None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    return True


def run(args, rest) -> int:
    """Run ``hf-signlock eval``; returns the exit code."""
    import torch

    from ..evaluation.perplexity import evaluate_model, markdown_report

    data_args = None
    if args.config:
        from ..training.recipe import parse_recipe

        data_args = parse_recipe(args.config, ["--output_dir", str(args.model)])[1]
    started = _init_distributed()
    try:
        result = evaluate_model(args.model, args.dataset, dataset_config_name=args.dataset_config_name,
                                split=args.split, text_column=args.text_column, window=args.window,
                                stride=args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                reference=args.reference, data_args=data_args, recorded_data=args.recorded_data,
                                base_model=args.base_model)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    written = []
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2, default=str))
        output.with_suffix(".md").write_text(markdown_report(result))
        written = [str(output), str(output.with_suffix(".md"))]
    extra = "".join(f", {key} {result[key]:.4g}" for key in ("bpw", "flip_rate") if key in result)
    print(f"{args.model}: perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens (window "
          f"{result['window']}, stride {result['stride']}){extra}; {result['dataset']}"
          + (f" -> {', '.join(written)}" if written else ""))
    return 0
