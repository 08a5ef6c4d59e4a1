"""The PNG figures of ``analyze`` (matplotlib, Agg backend: no display needed).

- ``spectra.png``: normalised singular values of sign(W) beside a Rademacher matrix's, for one layer of each
  shape (left), and every tested layer's KS p-value (right, log scale, the 1% line drawn);
- ``rank_errors.png``: relative rank-r error against r, mean over tested layers with its range, for sign(W), the
  Rademacher matrix and |W|;
- ``flips.png``: flip rate (when there is a reference) and near-zero fraction per layer, each bar named by its
  layer; a panel whose values are all zero says so ("no flips") instead of drawing an empty chart;
- ``crossings.png``: the crossing-count histogram of training with the fitted geometric tail (when recorded), on
  integer crossing counts, the fit drawn only on bins that hold weights.

``flips_figure`` and ``crossings_figure`` return the matplotlib figure (``write_figures`` saves and closes them).
"""

from __future__ import annotations

import os

import torch

from ..errors import MissingDependencyError
from .sign_metrics import ANALYSIS_EXTRA, normalise_spectrum, rademacher_singular_values


def require_matplotlib(needed_by: str = "The figures of `analyze` and `sweep`"):
    """``matplotlib.pyplot`` on the Agg backend, or MissingDependencyError naming the extra."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingDependencyError(f"{needed_by} need matplotlib: {ANALYSIS_EXTRA}") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.removesuffix(".weight").removeprefix("model.").replace("layers.", "")


def write_figures(result: dict, spectra: dict[str, torch.Tensor], output_dir: str | os.PathLike, seed: int = 0) -> list[str]:
    """Write the figures of one analysis into ``output_dir``; returns their file names."""
    plt = require_matplotlib()
    written = []
    tested = [entry for entry in result["layers"] if entry["name"] in spectra]
    if tested:
        written.append(_spectra(plt, tested, spectra, output_dir, seed, result["settings"]["ks_alpha"]))
        written.append(_rank_errors(plt, tested, result["settings"]["ranks"], output_dir))
    written.append(_flips(plt, result["layers"], output_dir))
    if result.get("training"):
        written.append(_crossings(plt, result["training"], output_dir))
    return written


def _save(plt, figure, output_dir, name: str) -> str:
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, name), dpi=110)
    plt.close(figure)
    return name


def _spectra(plt, tested, spectra, output_dir, seed, alpha) -> str:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_shape = {}
    for entry in tested:  # the middle layer of each shape: representative, not the first block's outlier
        by_shape.setdefault(tuple(entry["shape"]), []).append(entry)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (shape, entries) in enumerate(sorted(by_shape.items())[:6]):
        entry = entries[len(entries) // 2]
        color = colors[i % len(colors)]
        ours = spectra[entry["name"]].numpy()
        theirs = normalise_spectrum(rademacher_singular_values(shape, seed)).numpy()
        x = (torch.arange(len(ours)) / max(len(ours) - 1, 1)).numpy()
        left.plot(x, ours, color=color, label=f"sign(W) {_short(entry['name'])} {shape[0]}x{shape[1]}")
        left.plot(x, theirs, color=color, linestyle="--", linewidth=1, label=f"Rademacher {shape[0]}x{shape[1]}")
    left.set_yscale("log")
    left.set_xlabel("rank / (min dim - 1)")
    left.set_ylabel("normalised singular value")
    left.set_title("Spectrum of sign(W) (solid) vs i.i.d. random signs (dashed)")
    left.legend(fontsize=7)
    pvalues = [max(entry["ks_pvalue"], 1e-300) for entry in tested]
    right.scatter(range(len(pvalues)), pvalues, s=10)
    right.axhline(alpha, color="red", linestyle=":", label=f"p = {alpha}")
    right.set_yscale("log")
    right.set_xlabel("tested layer (model order)")
    right.set_ylabel("KS p-value vs Rademacher")
    right.set_title(f"{sum(p < alpha for p in pvalues)} of {len(pvalues)} layers reject random signs")
    right.legend()
    return _save(plt, figure, output_dir, "spectra.png")


def _rank_errors(plt, tested, ranks, output_dir) -> str:
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    labels = {"sign": "sign(W)", "rademacher": "Rademacher", "abs": "|W|"}
    for kind, label in labels.items():
        rows = torch.tensor([entry["rank_error"][kind] for entry in tested], dtype=torch.float64)
        axis.plot(ranks, rows.mean(0).numpy(), marker="o", label=label)
        axis.fill_between(ranks, rows.min(0).values.numpy(), rows.max(0).values.numpy(), alpha=0.15)
    axis.set_xscale("log")
    axis.set_xlabel("rank r")
    axis.set_ylabel("||A - A_r||_F / ||A||_F")
    axis.set_ylim(0, 1.02)
    axis.set_title("Best rank-r approximation error (mean, range over layers)")
    axis.legend()
    return _save(plt, figure, output_dir, "rank_errors.png")


MAX_LAYER_LABELS = 64  # above this, every k-th layer is named on the x axis


def _bars(axis, values, color, label: str, nothing: str) -> None:
    """Bars of ``values`` from 0; when every one is 0, an axis from 0 to 1 that says ``nothing`` instead of
    matplotlib's empty -0.04..0.04 one."""
    axis.bar(range(len(values)), values, width=0.8, color=color)
    axis.set_ylabel(label)
    if any(values):
        axis.set_ylim(bottom=0)
    else:
        axis.set_ylim(0, 1)
        axis.set_yticks([0])
        axis.text(0.5, 0.5, nothing, transform=axis.transAxes, ha="center", va="center", fontsize=11)


def flips_figure(plt, layers: list[dict]):
    """The figure of ``flips.png``: flip rate (with a reference) and near-zero fraction of each target layer, in
    model order, the layers named below the bars; returns the matplotlib figure."""
    has_flips = layers[0]["flip_rate"] is not None
    figure, axes = plt.subplots(2 if has_flips else 1, 1, figsize=(10, 7.5 if has_flips else 5), sharex=True,
                                squeeze=False)
    weights = sum(entry["weights"] for entry in layers)
    row = 0
    if has_flips:
        _bars(axes[0][0], [entry["flip_rate"] for entry in layers], "tab:blue", "flip rate",
              f"no flips: all {weights:,} target weights keep their reference sign")
        axes[0][0].set_title("Flip rate against the reference signs, per target layer")
        row = 1
    bottom = axes[row][0]
    _bars(bottom, [entry["near_zero_fraction"] for entry in layers], "tab:orange", "near-zero fraction",
          "no near-zero weights")
    if not has_flips:
        bottom.set_title("Near-zero fraction per target layer (no reference signs)")
    step = -(-len(layers) // MAX_LAYER_LABELS)  # ceil: at most MAX_LAYER_LABELS names
    shown = range(0, len(layers), step)
    bottom.set_xticks(list(shown), [_short(layers[i]["name"]) for i in shown], rotation=90, fontsize=7)
    bottom.set_xlim(-0.6, len(layers) - 0.4)
    bottom.set_xlabel("target layer (model order)" + (f", every {step}th named" if step > 1 else ""))
    return figure


def _flips(plt, layers, output_dir) -> str:
    return _save(plt, flips_figure(plt, layers), output_dir, "flips.png")


def _count_label(value, _position) -> str:
    return f"{value:,.0f}" if value >= 1 and float(value).is_integer() else ""


def crossings_figure(plt, training: dict):
    """The figure of ``crossings.png``: how many target weights crossed zero N times during training (bins up to
    the last one that holds weights, integer ticks), with the fitted geometric tail drawn on the bins that hold
    weights; returns the matplotlib figure."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    histogram = [max(int(n), 0) for n in training["crossing_histogram"]]
    ratio = training["geometric_tail_ratio"]
    last = max((k for k, n in enumerate(histogram) if n > 0), default=0)
    histogram = histogram[:last + 1]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    ks = list(range(len(histogram)))
    axis.bar(ks, histogram, width=0.8, label="weights with N crossings")
    survivors = sum(histogram[1:])
    if ratio is not None and survivors:
        # the geometric tail fitted beyond one crossing: #(N = k) = S(1) (1 - r) r^(k-1) for k >= 1; NaN on empty
        # bins, so that the line breaks there instead of running through bins no weight is in
        fit = [survivors * (1 - ratio) * ratio ** (k - 1) if histogram[k] else float("nan") for k in ks[1:]]
        axis.plot(ks[1:], fit, color="red", marker="o", markersize=4, label=f"geometric tail, r = {ratio:.3g}")
    if not survivors:
        axis.text(0.5, 0.5, "no weight crossed zero during training", transform=axis.transAxes, ha="center",
                  va="center", fontsize=11)
    axis.set_yscale("log")
    axis.set_ylim(bottom=0.5)  # a bin of one weight shows; counts are whole numbers, so are the labels
    axis.yaxis.set_major_formatter(FuncFormatter(_count_label))
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlim(-0.6, len(histogram) - 0.4)
    axis.set_xlabel("crossing count N")
    axis.set_ylabel("target weights")
    axis.set_title("Sign crossings during training")
    axis.legend()
    return figure


def _crossings(plt, training, output_dir) -> str:
    return _save(plt, crossings_figure(plt, training), output_dir, "crossings.png")
