"""Sign metrics of a weight matrix: pure tensor functions, plus ``flip_report`` over a model's target layers.

Definitions (docs/method.md):

- **flip rate** of a weight against reference signs ``s0``: the fraction of positions with ``w * s0 <= 0`` (a zero
  weight counts as flipped, as the trainer's tracking counts it);
- **near-zero fraction**: the fraction with ``|w| < band * scale``; ``scale`` is the weight's init std where it is
  known (what training reports), else the weight's own standard deviation (a pretrained model whose init is long
  gone; ``analyze`` records which one it used);
- **sign matrix** ``sign(W)``: +1 / -1 with a zero weight counted as +1 (as exports store signs);
- **normalised singular values** of a matrix ``A`` (m x n, k = min(m, n)): ``s_i * sqrt(k) / ||A||_F``, so that
  their mean square is 1 whatever the shape and scale. For a +-1 matrix this is ``s_i / sqrt(max(m, n))``, whose
  spectrum for i.i.d. random signs fills the Marchenko-Pastur support ``[1 - sqrt(k/M), 1 + sqrt(k/M)]``;
- **spectral test**: the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the normalised singular
  values of ``sign(W)`` against those of an i.i.d. Rademacher matrix of the same shape drawn from a seeded torch
  generator (reproducible; its spectrum is cached per shape and seed);
- **relative rank-r error** of a matrix ``A``: ``||A - A_r||_F / ||A||_F`` with ``A_r`` its best rank-r
  approximation, i.e. ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` (Eckart-Young): 0 for a matrix of rank <= r.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch

from ..errors import MissingDependencyError, SignLockConfigError

ANALYSIS_EXTRA = 'pip install "hf-signlock[analysis]"'


def require_scipy_stats():
    """``scipy.stats``, or MissingDependencyError naming the extra that installs it."""
    try:
        from scipy import stats
    except ImportError as error:
        raise MissingDependencyError(f"The spectral test needs scipy: {ANALYSIS_EXTRA}") from error
    return stats


# --- flips and near-zero weights --------------------------------------------------------------------------------------


def flip_count(weight: torch.Tensor, reference_signs: torch.Tensor) -> int:
    """How many positions of ``weight`` disagree with ``reference_signs`` (``w * s0 <= 0``; zero counts as flipped)."""
    if tuple(weight.shape) != tuple(reference_signs.shape):
        raise SignLockConfigError(f"weight of shape {tuple(weight.shape)} against reference signs of shape "
                                  f"{tuple(reference_signs.shape)}")
    # compared as booleans: no float copy of the weight, and a -0.0 is a zero like +0.0
    agree = torch.where(reference_signs.to(weight.device) > 0, weight > 0, weight < 0)
    return int(agree.numel() - agree.sum())


def flip_rate(weight: torch.Tensor, reference_signs: torch.Tensor) -> float:
    """Fraction of ``weight`` whose sign disagrees with ``reference_signs`` (+1/-1); zero counts as flipped."""
    if weight.numel() == 0:
        raise SignLockConfigError("flip_rate of an empty weight")
    return flip_count(weight, reference_signs) / weight.numel()


def near_zero_fraction(weight: torch.Tensor, band: float = 0.1, scale: float | None = None) -> float:
    """Fraction of ``weight`` with ``|w| < band * scale``.

    ``scale`` is the weight's init std when known (as training reports it); None uses the weight's own standard
    deviation, the documented choice for a model whose init std is unknown or long forgotten.
    """
    if not band >= 0:
        raise SignLockConfigError(f"`near_zero_band` must be >= 0, got {band}.")
    if scale is None:
        scale = float(weight.detach().double().std()) if weight.numel() > 1 else 0.0
    return float((weight.detach().abs() < band * scale).sum()) / weight.numel()


# --- spectra ------------------------------------------------------------------------------------------------------------


def sign_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``sign(W)`` as float64 +1/-1, a zero counting as +1 (as exports store signs)."""
    return torch.where(weight.detach() >= 0, 1.0, -1.0).to(torch.float64)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix, descending, in float64 on the CPU."""
    if matrix.dim() != 2:
        raise SignLockConfigError(f"singular values need a 2-D matrix, got shape {tuple(matrix.shape)}")
    matrix = matrix.detach().to("cpu", torch.float64)
    # LAPACK is several times faster on a tall matrix than on its wide transpose; the spectrum is the same
    return torch.linalg.svdvals(matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T)


def normalise_spectrum(values: torch.Tensor) -> torch.Tensor:
    """Singular values scaled to mean square 1: ``s * sqrt(k) / sqrt(sum s^2)`` (``sqrt(sum s^2) = ||A||_F``)."""
    values = values.to(torch.float64)
    total = float(values.square().sum())
    if total == 0:
        return values.clone()
    return values * math.sqrt(values.numel() / total)


def normalised_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Normalised singular values of ``matrix`` (see the module docstring), descending."""
    return normalise_spectrum(singular_values(matrix))


def rademacher_matrix(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """An i.i.d. +-1 matrix of ``shape`` (float64), from a torch generator seeded with ``seed``: the same on every
    machine and run."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1


@functools.lru_cache(maxsize=64)
def _rademacher_spectrum(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return singular_values(rademacher_matrix(shape, seed))


def rademacher_singular_values(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Singular values of ``rademacher_matrix(shape, seed)``, computed once per (shape, seed)."""
    rows, cols = shape
    return _rademacher_spectrum((int(rows), int(cols)), int(seed)).clone()


def spectral_ks_test(matrix: torch.Tensor, seed: int = 0, values: torch.Tensor | None = None) -> dict:
    """Two-sample KS test of the normalised singular values of ``matrix`` against an i.i.d. Rademacher matrix of the
    same shape (``rademacher_matrix(shape, seed)``).

    Returns ``statistic``, ``pvalue``, ``top_singular_value`` (the largest normalised singular value) and
    ``rademacher_top_singular_value`` (the Rademacher matrix's). ``values``: the matrix's singular values when
    already computed. A small p-value says the spectrum is not that of random signs.
    """
    ours = normalise_spectrum(singular_values(matrix) if values is None else values)
    theirs = normalise_spectrum(rademacher_singular_values(matrix.shape, seed))
    result = ks_2samp(ours, theirs)
    return {
        "statistic": float(result.statistic),
        "pvalue": float(result.pvalue),
        "top_singular_value": float(ours[0]),
        "rademacher_top_singular_value": float(theirs[0]),
    }


def ks_2samp(first: torch.Tensor, second: torch.Tensor):
    """``scipy.stats.ks_2samp`` of two samples; scipy's notice that it fell back from the exact p-value to the
    asymptotic one (large statistics) is expected here and not shown."""
    stats = require_scipy_stats()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Exact calculation unsuccessful.*")
        return stats.ks_2samp(first.numpy(), second.numpy())


def rank_errors(values: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """Relative rank-r errors ``||A - A_r||_F / ||A||_F`` for each r in ``ranks``, from the singular values of A
    (descending). r >= rank gives 0; r = 0 gives 1."""
    energy = values.to(torch.float64).square()
    total = float(energy.sum())
    if total == 0:
        return [0.0 for _ in ranks]
    # tail[r] = sum_{i >= r} s_i^2 (0-based), so tail[r] is what the best rank-r approximation leaves out
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    errors = []
    for r in ranks:
        if r < 0:
            raise SignLockConfigError(f"ranks must be >= 0, got {r}")
        errors.append(math.sqrt(max(float(tail[min(int(r), energy.numel())]), 0.0) / total))
    return errors


def rank_error(matrix: torch.Tensor, rank: int) -> float:
    """Relative rank-``rank`` error of one matrix (see ``rank_errors``)."""
    return rank_errors(singular_values(matrix), [rank])[0]


# --- a model against its reference ------------------------------------------------------------------------------------


def target_weights(model, reference=None, patterns: str | Sequence[str] | None = None) -> dict:
    """``param_name -> module`` (with a ``.weight``) of the layers compared with ``reference`` (a
    ``ReferenceSigns``): a compressed model's SignLock layers, else the modules ``patterns`` name, else those the
    reference was recorded for (an export's embedding and head included, its layers with packed signs left out),
    else every projection inside the transformer blocks."""
    from ..quantization.layers import compressed_layers
    from ..targets import find_target_modules

    skip = reference.skip_positions if reference is not None and patterns is None else ()
    layers = compressed_layers(model)
    if layers and patterns is None:
        return {layer.param_name: layer for i, layer in enumerate(layers.values()) if i not in skip}
    embeddings = False
    if patterns is None and reference is not None:
        patterns, embeddings = reference.target_modules, reference.target_embeddings
    targets = find_target_modules(model, patterns, embeddings)
    return {f"{name}.weight": module for i, (name, module) in enumerate(targets.items()) if i not in skip}


def flip_report(model, reference) -> dict:
    """Flip rate of ``model``'s target weights against ``reference`` (a ``ReferenceSigns``, see ``references.py``).

    Returns ``flip_rate`` (flips / weights), ``flips``, ``weights`` (target weights compared), ``reference`` (its
    description) and ``layers`` (``{param_name: flip_rate}``). The targets are the reference's recorded ones, else
    every projection in the transformer blocks; compressed SignLock layers are decoded one at a time. With
    ``reference=None`` (nothing recorded, none given), or no layer with signs of that kind (an export that stores
    every layer's signs packed), the rates are None.
    """
    targets = target_weights(model, reference)
    weights = sum(math.prod(module.weight.shape) for module in targets.values())
    if reference is None or not weights:
        return {"flip_rate": None, "flips": None, "weights": weights, "reference": None, "layers": {}}
    flips, layers = 0, {}
    with torch.no_grad():
        for name, module in targets.items():
            weight = module.weight
            count = flip_count(weight, reference.signs(name, tuple(weight.shape)))
            flips += count
            layers[name] = count / weight.numel()
    return {"flip_rate": flips / weights, "flips": flips, "weights": weights, "reference": reference.description,
            "layers": layers}
