"""The figures of ``hf-signlock sweep`` (matplotlib, Agg backend: no display needed).

- ``flip_rate_vs_lambda.png``: final flip rate against drift lambda, one line per condition and margin, the runs
  without drift (baseline, gap only) as horizontal lines; error bars and bands span the seeds (min to max);
- ``perplexity_vs_lambda.png``: the dense models' held-out perplexity, laid out the same way;
- ``perplexity_vs_bpw.png``: every export's perplexity against its total bits per target weight (everything counted),
  with each family's Pareto front drawn: seeded signs + coded flips per condition (baseline = "no regulariser"),
  and packed 1-bit signs;
- ``perplexity_vs_bits_per_parameter.png``: the whole-file exports' perplexity against bits per parameter of every
  byte of the file (embeddings, head, norms, headers and config included), one line per condition.
"""

from __future__ import annotations

import os
from pathlib import Path

from .figures import require_matplotlib

FIGURES = ("flip_rate_vs_lambda.png", "perplexity_vs_lambda.png", "perplexity_vs_bpw.png",
           "perplexity_vs_bits_per_parameter.png")
COLORS = {"baseline": "tab:gray", "gap": "tab:orange", "drift": "tab:blue", "gap_drift": "tab:green"}
LABELS = {"baseline": "baseline (no gap, no drift)", "gap": "gap only", "drift": "drift only",
          "gap_drift": "gap + drift"}


def _errors(summaries: list[dict]) -> list[list[float]]:
    """Asymmetric error bars (mean - min, max - mean)."""
    return [[s["mean"] - s["min"] for s in summaries], [s["max"] - s["mean"] for s in summaries]]


def _plain_ticks(axis) -> None:
    """Log-scaled perplexity axes read better as plain numbers than as 10^x."""
    from matplotlib.ticker import ScalarFormatter

    for formatter in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
        plain = ScalarFormatter()
        plain.set_scientific(False)
        formatter(plain)


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _versus_lambda(plt, groups: list[dict], metric: str, ylabel: str, path: Path, log_y: bool) -> Path:
    figure, axis = plt.subplots(figsize=(9.0, 4.2))
    weights = max((g["target_weights"] or 1) for g in groups) if groups else 1
    floor = 0.5 / weights  # 0 flips cannot be drawn on a log axis: at half a flip
    value = (lambda v: max(v, floor)) if log_y else (lambda v: v)
    drifted = [g for g in groups if g["condition"] in ("drift", "gap_drift") and g[metric] is not None]
    for condition in ("drift", "gap_drift"):
        margins = sorted({g["drift_margin"] for g in drifted if g["condition"] == condition})
        styles = ["-", "--", ":", "-."]
        for i, margin in enumerate(margins):
            line = sorted((g for g in drifted if g["condition"] == condition and g["drift_margin"] == margin),
                          key=lambda g: g["drift_lambda"])
            xs = [g["drift_lambda"] for g in line]
            summaries = [{k: value(v) if k in ("mean", "min", "max") else v for k, v in g[metric].items()}
                         for g in line]
            axis.errorbar(xs, [s["mean"] for s in summaries], yerr=_errors(summaries), marker="o", capsize=3,
                          color=COLORS[condition], linestyle=styles[i % len(styles)],
                          label=f"{LABELS[condition]}, margin {margin:g}")
    for condition in ("baseline", "gap"):
        for g in (g for g in groups if g["condition"] == condition and g[metric] is not None):
            s = g[metric]
            axis.axhline(value(s["mean"]), color=COLORS[condition], linewidth=1.2,
                         label=f"{LABELS[condition]} (lambda 0)" + (f", {s['n']} seeds" if s["n"] > 1 else ""))
            if s["n"] > 1:
                axis.axhspan(value(s["min"]), value(s["max"]), color=COLORS[condition], alpha=0.15, linewidth=0)
    axis.set_xscale("log")
    lambdas = sorted({g["drift_lambda"] for g in drifted})
    if lambdas:  # the grid's own values as ticks, plainly written
        axis.set_xticks(lambdas, [f"{v:g}" for v in lambdas])
        axis.xaxis.set_minor_formatter(_null_formatter())
    if log_y:
        axis.set_yscale("log")
        axis.axhline(1e-3, color="black", linestyle=":", linewidth=0.8, label="1e-3 (the paper's target)")
        axis.set_title(f"runs with 0 flips are drawn at {floor:.1g} (half a flip)", fontsize=8)
    axis.set_xlabel("drift lambda")
    axis.set_ylabel(ylabel)
    return _save(figure, axis, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bits, perplexity) points no other point beats on both: sorted by bits, perplexity strictly falling."""
    front = []
    for bits, ppl in sorted(points):
        if not front or ppl < front[-1][1]:
            front.append((bits, ppl))
    return front


def _versus_bits(plt, results: dict, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(9.6, 4.6))
    headline = results["spec"]["headline"]
    families: dict[tuple[str, str], list[dict]] = {}
    for g in results["export_groups"]:
        if g["feasible"] and g["signs"] != "file":  # whole-file exports: their own figure
            families.setdefault((g["condition"], g["signs"]), []).append(g)
    for (condition, signs), members in sorted(families.items()):
        color = COLORS[condition]
        packed = signs == "packed"
        label = f"{LABELS[condition]}, " + ("packed 1-bit signs" if packed else "seed + coded flips")
        if condition == "baseline" and not packed:
            label += " (no regulariser)"
        xs = [g["bpw"]["mean"] for g in members]
        ys = [g["perplexity"]["mean"] for g in members]
        marker = "s" if packed else "o"
        axis.scatter(xs, ys, color=color, marker=marker, alpha=0.35, s=14)
        front = pareto_front(list(zip(xs, ys)))
        axis.plot([p[0] for p in front], [p[1] for p in front], color=color, marker=marker,
                  linestyle="--" if packed else "-", label=label)
        spread = [g for g in members if g["perplexity"]["n"] > 1]
        if spread:
            axis.errorbar([g["bpw"]["mean"] for g in spread], [g["perplexity"]["mean"] for g in spread],
                          yerr=_errors([g["perplexity"] for g in spread]), fmt="none", ecolor=color, capsize=3)
    dense = {g["condition"]: g for g in results["groups"]
             if g["condition"] == "baseline" or (g["condition"] == "gap_drift"
                                                  and g["drift_lambda"] == headline["drift_lambda"]
                                                  and g["drift_margin"] == headline["drift_margin"])}
    for condition, g in dense.items():
        if g["perplexity"] is not None:
            axis.axhline(g["perplexity"]["mean"], color=COLORS[condition], linestyle=":", linewidth=1,
                         label=f"{LABELS[condition]}, dense model")
    axis.set_xlabel("total bits per target weight (signs + magnitudes + overhead)")
    axis.set_ylabel("held-out perplexity")
    everything = [g["perplexity"]["mean"] for members in families.values() for g in members]
    if everything and max(everything) > 3 * min(everything):  # a log axis only where the range needs one
        axis.set_yscale("log")
        _plain_ticks(axis)
    axis.set_title("lines: Pareto front of each family; bars: seeds (min to max)", fontsize=8)
    return _save(figure, axis, path)


def _versus_file_bits(plt, results: dict, path: Path) -> Path:
    """Perplexity of the whole-file exports against their bits per parameter, the best setting of each condition
    per budget (its Pareto front), the dense models' perplexity beside them."""
    figure, axis = plt.subplots(figsize=(9.6, 4.6))
    families: dict[str, list[dict]] = {}
    for g in results["export_groups"]:
        if g["feasible"] and g["signs"] == "file" and g.get("bits_per_parameter"):
            families.setdefault(g["condition"], []).append(g)
    for condition, members in sorted(families.items()):
        xs = [g["bits_per_parameter"]["mean"] for g in members]
        ys = [g["perplexity"]["mean"] for g in members]
        axis.scatter(xs, ys, color=COLORS[condition], alpha=0.35, s=14)
        front = pareto_front(list(zip(xs, ys)))
        axis.plot([p[0] for p in front], [p[1] for p in front], color=COLORS[condition], marker="o",
                  label=f"{LABELS[condition]}: whole file")
        spread = [g for g in members if g["perplexity"]["n"] > 1]
        if spread:
            axis.errorbar([g["bits_per_parameter"]["mean"] for g in spread],
                          [g["perplexity"]["mean"] for g in spread], yerr=_errors([g["perplexity"] for g in spread]),
                          fmt="none", ecolor=COLORS[condition], capsize=3)
    axis.set_xlabel("bits per parameter of the whole file (every byte: embeddings, head, norms, headers, config)")
    axis.set_ylabel("held-out perplexity")
    everything = [g["perplexity"]["mean"] for members in families.values() for g in members]
    if everything and max(everything) > 3 * min(everything):
        axis.set_yscale("log")
        _plain_ticks(axis)
    axis.set_title("whole-file exports: lines: Pareto front of each condition; bars: seeds (min to max)", fontsize=8)
    return _save(figure, axis, path)


def plot_sweep(results: dict, output_dir: str | os.PathLike) -> list[Path]:
    """Write the sweep's figures into ``output_dir``; returns their paths (none without finished runs)."""
    plt = require_matplotlib()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    groups = results["groups"]
    if not groups:
        return []
    paths = [
        _versus_lambda(plt, groups, "flip_rate", "final flip rate vs initial signs", output_dir / FIGURES[0], True),
        _versus_lambda(plt, groups, "perplexity", "held-out perplexity (dense)", output_dir / FIGURES[1], False),
    ]
    if any(g["feasible"] and g["signs"] != "file" for g in results["export_groups"]):
        paths.append(_versus_bits(plt, results, output_dir / FIGURES[2]))
    if any(g["feasible"] and g["signs"] == "file" for g in results["export_groups"]):
        paths.append(_versus_file_bits(plt, results, output_dir / FIGURES[3]))
    return paths


def _save(figure, axis, path):
    """Legend beside the axes, a light grid, written at 120 dpi; the figure is closed (the sweep draws many)."""
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    require_matplotlib().close(figure)
    return path
