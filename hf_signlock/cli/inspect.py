"""``hf-signlock inspect DIR``: the bits of a SignLock checkpoint: the whole file first, then per target layer.

Counted from the files themselves (see ``hf_signlock.quantization.bits``), not read from ``bpw.json``.
"""

from __future__ import annotations

import json

from .options import option


def add_parser(commands) -> None:
    """Add the ``inspect`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser("inspect", help="Bits of a SignLock checkpoint, per layer, in total, whole file.")
    parser.add_argument("folder")
    option(parser, "json", action="store_true", help="print the report as JSON")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def run(args, rest) -> int:
    """Run ``hf-signlock inspect``; returns the exit code."""
    from ..quantization.bits import checkpoint_report

    report = checkpoint_report(args.folder)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    checkpoint = report["checkpoint"]
    print(f"whole file: {checkpoint['bytes']:,} bytes for {checkpoint['parameters']:,} parameters = "
          f"{checkpoint['bits_per_parameter']:.3f} bits per parameter (dense bf16: {checkpoint['dense_bf16_bytes']:,} "
          f"bytes, {checkpoint['bytes'] / checkpoint['dense_bf16_bytes']:.3f}x)")
    parts = checkpoint["bytes_by_part"]
    print("  " + "; ".join(f"{part} {value:,.0f} bytes ({value / checkpoint['bytes']:.1%})"
                           for part, value in parts.items()))
    rows = [("layer", "weights", "flips", "sign bits", "magnitude bits", "other bits", "bpw", "codec parameters")]
    for name, layer in [*report["layers"].items(), ("total", report["total"])]:
        flips = "-" if layer["flips"] is None else f"{layer['flips']:,}"
        params = " ".join(f"{k}={v}" for k, v in layer.get("codec_params", {}).items())
        rows.append((name, f"{layer['weights']:,}", flips, f"{layer['sign_bits']:,.0f}",
                     f"{layer['magnitude_bits']:,.0f}", f"{layer['other_bits']:,.0f}",
                     f"{layer['total_bits'] / layer['weights']:.4f}", params))
    print()
    print(_table(rows))
    print(f"\nsigns: {report['sign_source']}, codec: {report['codec']} {report.get('codec_params') or ''}")
    print(f"bits per target weight: {report['bpw']:.4f} (every byte a target layer adds: payload, bias, header "
          "entries, its record, its share of the SignLock overhead)")
    return 0
