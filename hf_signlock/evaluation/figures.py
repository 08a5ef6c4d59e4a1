"""The PNG figures of ``analyze`` (matplotlib, Agg backend: no display needed).

- ``spectra.png``: normalised singular values of sign(W) beside a Rademacher matrix's, for one layer of each
  shape (left), and every tested layer's KS p-value (right, log scale, the 1% line drawn);
- ``rank_errors.png``: relative rank-r error against r, mean over tested layers with its range, for sign(W), the
  Rademacher matrix and |W|;
- ``flips.png``: flip rate (when there is a reference) and near-zero fraction per layer;
- ``crossings.png``: the crossing-count histogram of training with the fitted geometric tail (when recorded).
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


def _flips(plt, layers, output_dir) -> str:
    has_flips = layers[0]["flip_rate"] is not None
    figure, axes = plt.subplots(2 if has_flips else 1, 1, figsize=(10, 6 if has_flips else 3.5), sharex=True,
                                squeeze=False)
    x = range(len(layers))
    row = 0
    if has_flips:
        axes[0][0].bar(x, [entry["flip_rate"] for entry in layers], width=1.0)
        axes[0][0].set_ylabel("flip rate")
        axes[0][0].set_title("Flip rate against the reference signs, per target layer")
        row = 1
    axes[row][0].bar(x, [entry["near_zero_fraction"] for entry in layers], width=1.0, color="tab:orange")
    axes[row][0].set_ylabel("near-zero fraction")
    axes[row][0].set_xlabel("target layer (model order)")
    if not has_flips:
        axes[row][0].set_title("Near-zero fraction per target layer (no reference signs)")
    return _save(plt, figure, output_dir, "flips.png")


def _crossings(plt, training, output_dir) -> str:
    histogram = training["crossing_histogram"]
    ratio = training["geometric_tail_ratio"]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    ks = list(range(len(histogram)))
    axis.bar(ks, [max(n, 0) for n in histogram], label="weights with N crossings")
    if ratio is not None and len(histogram) > 1:
        # the geometric tail fitted beyond one crossing: #(N = k) = S(1) (1 - r) r^(k-1) for k >= 1
        survivors = sum(histogram[1:])
        fit = [survivors * (1 - ratio) * ratio ** (k - 1) for k in ks[1:]]
        axis.plot(ks[1:], fit, color="red", marker=".", label=f"geometric tail, r = {ratio:.3g}")
    axis.set_yscale("log")
    axis.set_xlabel("crossing count N")
    axis.set_ylabel("target weights")
    axis.set_title("Sign crossings during training")
    axis.legend()
    return _save(plt, figure, output_dir, "crossings.png")
