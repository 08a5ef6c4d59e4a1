"""``hf-signlock signs BASE OUT``: publish a base model's signs once, as a sign pack (1 bit per target weight).

Fine-tunes of BASE exported with ``sign_source="base"`` store only the signs that differ from BASE's; naming OUT
(a folder, or the Hub repo it is uploaded to) as their ``base_model`` lets them load without the dense base.
"""

from __future__ import annotations

import json
import math

from .options import boolean, option


def add_parser(commands) -> None:
    """Add the ``signs`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser("signs", help="Write a base model's signs as a sign pack (1 bit per target weight).")
    parser.add_argument("base", help="the base model: a local folder or a Hub id (dense safetensors or SignLock)")
    parser.add_argument("out_dir", help="folder to write signlock_signs.safetensors into (upload it as a Hub repo)")
    option(parser, "revision", default=None, help="Hub revision of BASE (default: main)")
    option(parser, "target_modules", nargs="*", default=None,
           help="modules whose signs to keep (default: every projection inside the transformer blocks)")
    option(parser, "target_embeddings", type=boolean, default=True,
           help="keep the token embedding's and an untied LM head's signs too (default: true, as exports of "
                "fine-tunes compress them)")


def run(args, rest) -> int:
    """Run ``hf-signlock signs``; prints the pack's path, size and what it holds."""
    from safetensors import safe_open

    from ..quantization.base_signs import save_sign_pack

    path = save_sign_pack(args.base, args.out_dir, revision=args.revision, target_modules=args.target_modules,
                          target_embeddings=args.target_embeddings)
    with safe_open(str(path), "pt") as handle:
        shapes = json.loads(handle.metadata()["shapes"])
    weights, size = sum(math.prod(shape) for _, shape in shapes), path.stat().st_size
    data = sum(math.ceil(math.prod(shape) / 8) for _, shape in shapes)
    print(f"{path}: the signs of {weights:,} weights in {len(shapes)} target layers, {size:,} bytes ({data:,} of "
          f"signs, 1 bit per weight, and a {size - data:,}-byte header)")
    return 0
