"""``analyze``: the sign statistics of a checkpoint, per target layer and in total, as JSON, figures and a report.

Per target layer (every projection inside the transformer blocks, or the ones MODEL records or ``target_modules``
names):

- flip rate against the reference signs (``references.py``; none for a model that records none and gets none);
- near-zero fraction: ``|w| < band * scale``, ``scale`` the layer's init std for a model with training statistics
  (a run or an export of ours: the number its training reported) and the layer's own std otherwise (a pretrained
  model whose init is long gone); ``near_zero_scale`` forces either, and the JSON records which was used;
- the spectral test: normalised singular values of ``sign(W)`` against an i.i.d. Rademacher matrix of the same
  shape (two-sample KS statistic and p-value; the top singular value beside the Rademacher one);
- relative rank-r errors ``||A - A_r||_F / ||A||_F`` of ``sign(W)``, of the Rademacher matrix and of ``|W|``.

In total: the flip and near-zero counts over all target weights; the spectral results summarised (median p-value,
how many layers reject at 1%, a pooled KS test over every tested layer's spectrum), with a Rademacher-vs-Rademacher
control per shape to show how close two random sign matrices' spectra are; the crossing-count histogram and its
fitted geometric tail ratio when MODEL carries training statistics.

The normalised spectra, KS test and rank errors need two float64 SVDs per layer, the only costly part; they run one
layer per thread with single-threaded kernels (see ``_spectral_workers``). ``sample`` bounds how many layers get
them: about that many, every kind of projection represented and spread evenly over the blocks, first and last
included (``sample_layers``); flips and near-zero counts always cover every target. All 210 layers of SmolLM2-135M
take well under the 5-minute bound on 2 CPU cores (``bench/bench_analyze.py``, ``bench/results/analyze.md``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Sequence

import torch
from transformers.utils import logging

from ..errors import SignLockConfigError
from . import sign_metrics as metrics
from .references import evenly_spaced, resolve_reference, training_statistics

logger = logging.get_logger(__name__)

DEFAULT_RANKS = (1, 8, 32, 128)
DEFAULT_NEAR_ZERO_BAND = 0.1  # the trainer's default `near_zero_band`
NEAR_ZERO_SCALES = ("auto", "init", "layer")
KS_ALPHA = 0.01  # a layer "rejects" the Rademacher hypothesis below this p-value
ANALYSIS_JSON, ANALYSIS_MD = "analysis.json", "analysis.md"


def _group(name: str) -> str:
    """The kind of projection a parameter is (``q_proj``, ``mlp.c_fc``...): its module name without the block."""
    parts = name.removesuffix(".weight").split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else parts[-1]


def sample_layers(names: list[str], count: int) -> list[str]:
    """About ``count`` of ``names``, every kind of projection represented: each kind gets its share (at least one),
    spread evenly over the blocks, first and last included; in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_group(name), []).append(name)
    chosen = set()
    for members in groups.values():
        chosen.update(evenly_spaced(members, max(1, round(count * len(members) / len(names)))))
    return [name for name in names if name in chosen]


def _finite(value):
    """JSON has no NaN: a non-finite float becomes None."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _check_ranks(ranks: Sequence[int]) -> list[int]:
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 1:
        raise SignLockConfigError(f"`ranks` must be positive integers, got {list(ranks)}.")
    return ranks


def _near_zero_scales(model, targets: dict, mode: str, has_stats: bool) -> tuple[dict, str]:
    """``param_name -> scale`` (None: the layer's own std) and a description of the choice."""
    if mode not in NEAR_ZERO_SCALES:
        raise SignLockConfigError(f"`near_zero_scale` must be one of {NEAR_ZERO_SCALES}, got {mode!r}.")
    if mode == "layer" or (mode == "auto" and not has_stats):
        return dict.fromkeys(targets), "the layer's own std"
    from ..training.init_distribution import init_distributions

    try:
        dists = init_distributions(model, list(targets))
    except (SignLockConfigError, TypeError, AttributeError) as error:  # compressed layers, custom init code
        if mode == "init":
            raise SignLockConfigError(f"`near_zero_scale='init'`: {error}") from error
        return dict.fromkeys(targets), "the layer's own std (init std unreadable)"
    return {name: dists[name].std for name in targets}, "the layer's init std"


def _training_section(model_source: str) -> dict | None:
    """The crossing statistics a run or an export records (``signlock_stats.json`` / ``training_...``)."""
    from ..training.tracking import geometric_tail_ratio, tail_ratios

    stats, where = training_statistics(model_source)
    if not stats or not stats.get("crossing_histogram"):
        return None
    histogram = [int(n) for n in stats["crossing_histogram"]]
    return {
        "source": where,
        "crossing_histogram": histogram,
        "geometric_tail_ratio": geometric_tail_ratio(histogram),
        "tail_ratios": tail_ratios(histogram),
        "flip_tracking_steps": stats.get("flip_tracking_steps"),
        "recorded_flip_rate": stats.get("flip_rate"),
        "recorded_near_zero_fraction": stats.get("near_zero_fraction"),
    }


SPECTRAL_FIELDS = ("ks_statistic", "ks_pvalue", "top_singular_value", "rademacher_top_singular_value", "rank_error")


@torch.no_grad()
def _spectral(name: str, weight: torch.Tensor, ranks: list[int], seed: int) -> tuple[str, dict, torch.Tensor]:
    """The spectral test and rank errors of one layer (two SVDs); returns its fields and normalised spectrum."""
    signs = metrics.sign_matrix(weight)
    values = metrics.singular_values(signs)
    ks = metrics.spectral_ks_test(signs, seed, values=values)
    random = metrics.rademacher_singular_values(weight.shape, seed)
    fields = {"ks_statistic": ks["statistic"], "ks_pvalue": ks["pvalue"],
              "top_singular_value": ks["top_singular_value"],
              "rademacher_top_singular_value": ks["rademacher_top_singular_value"],
              "rank_error": {"sign": metrics.rank_errors(values, ranks),
                             "rademacher": metrics.rank_errors(random, ranks),
                             "abs": metrics.rank_errors(metrics.singular_values(weight.abs()), ranks)}}
    return name, fields, metrics.normalise_spectrum(values)


def _collect(pending: set, layers: dict, spectra: dict, progress, when) -> set:
    done, pending = concurrent.futures.wait(pending, return_when=when)
    for future in done:
        name, fields, spectrum = future.result()
        layers[name].update(fields)
        spectra[name] = spectrum
        progress.update()
    return pending


@contextlib.contextmanager
def _spectral_workers(workers: int | None):
    """A pool of ``workers`` threads (default: torch's thread count), each running single-threaded kernels, and how
    many layers to keep in flight.

    One SVD per core beats every core on one SVD at these sizes, and above all it keeps its speed on a shared
    machine: multi-threaded LAPACK spins at its barriers when another process holds a core, which measured 3 to 10
    times slower on 2 busy cores. torch's thread count is process-wide, so it is restored afterwards.
    """
    previous = torch.get_num_threads()
    workers = workers or previous
    if workers < 1:
        raise SignLockConfigError(f"`workers` must be >= 1, got {workers}.")
    torch.set_num_threads(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            yield pool, 2 * workers  # layers in flight: every worker busy, one queued each
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def analyze(model_source: str, reference: str | int | None = None, output_dir: str | os.PathLike | None = None,
            ranks: Sequence[int] = DEFAULT_RANKS, sample: int | None = None, *,
            target_modules: str | Sequence[str] | None = None, near_zero_band: float = DEFAULT_NEAR_ZERO_BAND,
            near_zero_scale: str = "auto", seed: int = 0, figures: bool = True, workers: int | None = None,
            model=None) -> dict:
    """Sign statistics of ``model_source`` (a local folder or Hub id, dense or SignLock) against ``reference``.

    Args:
        model_source: MODEL; loaded with ``from_pretrained`` unless ``model`` (already loaded from it) is given.
        reference: where the reference signs come from (``resolve_reference``); None: what MODEL records.
        output_dir: when given, ``analysis.json``, ``analysis.md`` and PNG figures are written there.
        ranks: the r of the relative rank-r errors.
        sample: about how many target layers get the spectral test and rank errors (None: all); see
            ``sample_layers``.
        target_modules: which layers (None: those MODEL records, else every projection in the blocks).
        near_zero_band, near_zero_scale: the near-zero band, in units of "init" std, the "layer"'s own std, or
            "auto" (init std for models with training statistics, else the layer's std).
        seed: seed of the Rademacher baseline matrices.
        figures: write PNG figures (needs matplotlib) with the report.
        workers: threads computing the SVDs, one layer each (default: torch's thread count).

    Returns the content of ``analysis.json``: ``{"model", "reference", "settings", "layers": [...], "total": {...},
    "training": {...} or None, "figures": [...]}``.
    """
    from .loading import load_causal_lm

    metrics.require_scipy_stats()
    if output_dir is not None and figures:
        from .figures import require_matplotlib

        require_matplotlib()
    ranks = _check_ranks(ranks)
    if sample is not None and sample < 1:
        raise SignLockConfigError(f"`sample` must be >= 1 (layers given the spectral test), got {sample}.")
    if not near_zero_band >= 0:
        raise SignLockConfigError(f"`near_zero_band` must be >= 0, got {near_zero_band}.")
    started = time.perf_counter()
    model_source = str(model_source)
    if model is None:
        model = load_causal_lm(model_source, "MODEL")
    ref = resolve_reference(model_source, reference, model)
    targets = metrics.target_weights(model, ref, target_modules)
    training = _training_section(model_source)
    scales, scale_description = _near_zero_scales(model, targets, near_zero_scale, training is not None)
    tested = set(sample_layers(list(targets), sample)) if sample else set(targets)

    layers, spectra = {}, {}
    progress = logging.tqdm(total=len(targets), desc="analyze: sign statistics", unit="layer")
    with _spectral_workers(workers) as (pool, in_flight):
        pending = set()
        for name, module in targets.items():
            weight = module.weight.detach()  # a compressed layer decodes here, in this thread, one at a time
            entry = {"name": name, "shape": list(weight.shape), "weights": weight.numel(), "flips": None,
                     "flip_rate": None}
            if ref is not None:
                entry["flips"] = metrics.flip_count(weight, ref.signs(name, tuple(weight.shape)))
                entry["flip_rate"] = entry["flips"] / weight.numel()
            entry["near_zero_fraction"] = metrics.near_zero_fraction(weight, near_zero_band, scales[name])
            entry.update(dict.fromkeys(SPECTRAL_FIELDS))
            layers[name] = entry
            if name in tested and weight.dim() == 2:
                pending.add(pool.submit(_spectral, name, weight, ranks, seed))
            else:
                progress.update()
            if len(pending) >= in_flight:  # bounded: a few decoded weights in flight, not the model
                pending = _collect(pending, layers, spectra, progress, concurrent.futures.FIRST_COMPLETED)
        _collect(pending, layers, spectra, progress, concurrent.futures.ALL_COMPLETED)
        progress.close()
        layers = [{key: _finite(value) for key, value in entry.items()} for entry in layers.values()]
        total = _totals(layers, spectra, ranks, seed)  # its control SVDs, single-threaded too
    result = {
        "model": model_source,
        "reference": None if ref is None else ref.description,
        "settings": {"ranks": ranks, "sample": sample, "layers_tested": len(spectra), "rademacher_seed": seed,
                     "near_zero_band": near_zero_band, "near_zero_scale": scale_description,
                     "target_modules": target_modules if target_modules is not None else
                     (ref.target_modules if ref is not None else None), "ks_alpha": KS_ALPHA},
        "layers": layers,
        "total": total,
        "training": training,
        "figures": [],
        "seconds": None,
    }
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        if figures:
            from .figures import write_figures

            result["figures"] = write_figures(result, spectra, output_dir, seed)
        result["seconds"] = time.perf_counter() - started
        with open(os.path.join(output_dir, ANALYSIS_JSON), "w") as handle:
            json.dump(result, handle, indent=1, allow_nan=False)
        with open(os.path.join(output_dir, ANALYSIS_MD), "w") as handle:
            handle.write(markdown_report(result))
    result["seconds"] = time.perf_counter() - started
    return result


def _totals(layers: list[dict], spectra: dict[str, torch.Tensor], ranks: list[int], seed: int) -> dict:
    """The summary over all layers: counts over every weight; spectral results over the tested layers."""
    weights = sum(entry["weights"] for entry in layers)
    flips = None if layers[0]["flips"] is None else sum(entry["flips"] for entry in layers)
    near_zero = sum(entry["near_zero_fraction"] * entry["weights"] for entry in layers)
    total = {"layers": len(layers), "weights": weights, "flips": flips,
             "flip_rate": None if flips is None else flips / weights, "near_zero_fraction": near_zero / weights,
             "layers_tested": len(spectra)}
    tested = [entry for entry in layers if entry["name"] in spectra]
    if not tested:
        return total
    pvalues = [entry["ks_pvalue"] for entry in tested]
    # pooled: all tested spectra against their Rademacher twins (both sides mix the same shapes); the twins repeat
    # one matrix per shape, so its p-value is indicative, not a test of independent samples
    shapes = {entry["name"]: tuple(entry["shape"]) for entry in tested}
    ours = torch.cat([spectra[name] for name in shapes])
    theirs = torch.cat([metrics.normalise_spectrum(metrics.rademacher_singular_values(shape, seed))
                        for shape in shapes.values()])
    pooled = metrics.ks_2samp(ours, theirs)
    control = {}
    for shape in sorted(set(shapes.values())):  # two independent random sign matrices: the null's scale
        a = metrics.normalise_spectrum(metrics.rademacher_singular_values(shape, seed))
        b = metrics.normalise_spectrum(metrics.singular_values(metrics.rademacher_matrix(shape, seed + 1)))
        test = metrics.ks_2samp(a, b)
        control["x".join(map(str, shape))] = {"ks_statistic": float(test.statistic), "ks_pvalue": float(test.pvalue)}
    total.update(
        ks_statistic_mean=statistics.fmean(entry["ks_statistic"] for entry in tested),
        ks_statistic_max=max(entry["ks_statistic"] for entry in tested),
        ks_pvalue_median=statistics.median(pvalues),
        ks_pvalue_min=min(pvalues),
        layers_rejected=sum(p < KS_ALPHA for p in pvalues),
        pooled_ks_statistic=float(pooled.statistic),
        pooled_ks_pvalue=float(pooled.pvalue),
        top_singular_value_mean=statistics.fmean(entry["top_singular_value"] for entry in tested),
        rademacher_top_singular_value_mean=statistics.fmean(entry["rademacher_top_singular_value"] for entry in tested),
        rank_error={kind: [statistics.fmean(entry["rank_error"][kind][i] for entry in tested)
                           for i in range(len(ranks))] for kind in ("sign", "rademacher", "abs")},
        rademacher_control=control,
    )
    return {key: _finite(value) for key, value in total.items()}


# --- the report -------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def group_summary(result: dict) -> list[dict]:
    """Per kind of projection (q_proj, up_proj...): weights, flip rate, near-zero fraction, KS median p-value and
    rejections, mean rank errors; in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for entry in result["layers"]:
        groups.setdefault(_group(entry["name"]), []).append(entry)
    rows = []
    for group, entries in groups.items():
        weights = sum(e["weights"] for e in entries)
        tested = [e for e in entries if e["ks_pvalue"] is not None]
        row = {"group": group, "layers": len(entries), "weights": weights,
               "flip_rate": None if entries[0]["flips"] is None else sum(e["flips"] for e in entries) / weights,
               "near_zero_fraction": sum(e["near_zero_fraction"] * e["weights"] for e in entries) / weights,
               "tested": len(tested)}
        if tested:
            row.update(ks_pvalue_median=statistics.median(e["ks_pvalue"] for e in tested),
                       rejected=sum(e["ks_pvalue"] < KS_ALPHA for e in tested),
                       top_ratio=statistics.fmean(e["top_singular_value"] / e["rademacher_top_singular_value"]
                                                  for e in tested),
                       rank_error={kind: [statistics.fmean(e["rank_error"][kind][i] for e in tested)
                                          for i in range(len(result["settings"]["ranks"]))]
                                   for kind in ("sign", "rademacher", "abs")})
        rows.append(row)
    return rows


def markdown_report(result: dict) -> str:
    """``analysis.md``: what was measured, the totals, a table per kind of projection and the figures."""
    total, settings = result["total"], result["settings"]
    ranks = settings["ranks"]
    lines = [f"# Sign analysis of `{result['model']}`", ""]
    lines.append(f"Reference signs: {result['reference'] or 'none (MODEL records none and none was given)'}.")
    lines.append(f"{total['layers']} target layers, {total['weights']:,} weights; spectral test on "
                 f"{settings['layers_tested']} of them (Rademacher seed {settings['rademacher_seed']}); near-zero band "
                 f"{settings['near_zero_band']} x {settings['near_zero_scale']}.")
    lines.append("")
    if total["flip_rate"] is not None:
        lines.append(f"- **Flip rate**: {total['flip_rate']:.4g} ({total['flips']:,} of {total['weights']:,} weights "
                     "disagree with the reference).")
    lines.append(f"- **Near-zero fraction**: {total['near_zero_fraction']:.4g}.")
    if total.get("layers_tested"):
        control = max(c["ks_statistic"] for c in total["rademacher_control"].values())
        pooled_p = total.get("pooled_ks_pvalue")
        pooled_rejects = pooled_p is not None and pooled_p < settings["ks_alpha"]
        # the per-layer test is weak (a few outlying singular values barely move the curve): the pooled one counts too
        verdict = ("not those of i.i.d. random signs in some layers" if total["layers_rejected"] else
                   "close to, but measurably not, those of i.i.d. random signs (the pooled test rejects)"
                   if pooled_rejects else "indistinguishable from i.i.d. random signs")
        lines.append(
            f"- **Spectrum of sign(W)** vs an i.i.d. Rademacher matrix: KS statistic mean "
            f"{total['ks_statistic_mean']:.3g} (max {total['ks_statistic_max']:.3g}; two random sign matrices differ "
            f"by up to {control:.3g}), median p-value {total['ks_pvalue_median']:.3g}; "
            f"{total['layers_rejected']} of {total['layers_tested']} layers reject at p < {settings['ks_alpha']}; "
            f"pooled over all tested layers: KS {total['pooled_ks_statistic']:.3g}, p = {total['pooled_ks_pvalue']:.3g} "
            "(indicative: one Rademacher matrix per shape serves every layer). "
            f"Top normalised singular value {total['top_singular_value_mean']:.3g} on average, against "
            f"{total['rademacher_top_singular_value_mean']:.3g} for random signs. By this test the spectra are "
            f"{verdict}.")
        errors = total["rank_error"]
        lines.append("- **Relative rank-r error** (mean over tested layers), r = " + ", ".join(map(str, ranks)) + ": "
                     f"sign(W) {', '.join(_fmt(e) for e in errors['sign'])}; Rademacher "
                     f"{', '.join(_fmt(e) for e in errors['rademacher'])}; |W| {', '.join(_fmt(e) for e in errors['abs'])}.")
    training = result.get("training")
    if training:
        ratio = training["geometric_tail_ratio"]
        lines.append(f"- **Crossing counts** during training ({training['source']}): histogram "
                     f"{training['crossing_histogram'][:8]}{'...' if len(training['crossing_histogram']) > 8 else ''}; "
                     f"fitted geometric tail ratio {_fmt(ratio)}.")
    lines += ["", "## Per kind of projection", ""]
    rank_head = " | ".join(f"r={r} sign / rad / abs" for r in ranks)
    lines.append(f"| projection | layers | weights | flip rate | near-zero | KS median p | rejected | top / rad top | "
                 f"{rank_head} |")
    lines.append("|" + "---|" * (8 + len(ranks)))
    for row in group_summary(result):
        errors = row.get("rank_error")
        cells = [" / ".join(_fmt(errors[k][i], ".2f") for k in ("sign", "rademacher", "abs")) if errors else "-"
                 for i in range(len(ranks))]
        lines.append(f"| {row['group']} | {row['layers']} | {row['weights']:,} | {_fmt(row['flip_rate'], '.4g')} | "
                     f"{_fmt(row['near_zero_fraction'], '.4g')} | {_fmt(row.get('ks_pvalue_median'))} | "
                     f"{row.get('rejected', '-')}/{row['tested']} | {_fmt(row.get('top_ratio'))} | "
                     + " | ".join(cells) + " |")
    if result["figures"]:
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({name})" for name in result["figures"]]
    lines += ["", f"Every layer's numbers are in `{ANALYSIS_JSON}`.", ""]
    return "\n".join(lines)
