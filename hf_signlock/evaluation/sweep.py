"""``hf-signlock sweep``: the method's ablation grid trained, exported, evaluated and plotted, resumable by point.

A sweep file (YAML, the fields of :class:`SweepSpec`) names a base recipe and the grid. Every training run is the
base recipe with a few flags set (``overrides`` first, then the point's ``gap``, ``drift_lambda``,
``drift_margin``, ``seed`` and ``output_dir``). The conditions:

- ``baseline``: ordinary init (gap 0, seeded signs), no regulariser;
- ``gap``: gap-based init (``gap``), no regulariser;
- ``drift``: ordinary init, outward drift over the grid ``drift_lambdas`` x ``drift_margins``;
- ``gap_drift``: gap-based init and outward drift over the same grid.

Every run gets ``seeds``; the runs of ``replicate_conditions`` at the ``headline`` setting also get
``replicate_seeds`` (the comparisons whose differences are small: the baseline against the recommended method), so
the results show a spread. Every run is exported with its own seeded signs plus coded flips at each of ``budgets``
(total bits per target weight of the block projections, everything counted: ``bpw.json``), the runs of
``packed_conditions`` also with packed 1-bit signs at ``packed_budgets``, and every run as a whole file (embeddings
and head compressed too) at each of ``file_budgets`` bits per parameter; a budget the codec cannot meet is recorded
as ``infeasible``. Every run and export
is evaluated with :func:`~hf_signlock.evaluation.perplexity.evaluate_folder` on the held-out split of its data; the
runs of ``analyze`` (first seed, headline setting) go through :func:`~hf_signlock.evaluation.analyze.analyze`.

Layout of ``output_dir``: ``runs/<run>/`` (the training output), ``exports/<run>/<signs>-<budget>bpw/``,
``analysis/<run>/``; each point's folder holds ``sweep_point.json`` once the point is complete (written to a
temporary file and renamed, so it exists whole or not at all), with the hash of every setting the point depends on.
A rerun skips a point whose file exists with the same hash, so finished points are never recomputed and an
interrupted sweep resumes. A training run that stopped midway restarts from its last Trainer checkpoint (written
every ``save_steps``; the Trainer resumes the model, optimizer, scheduler, data order and flip tracking exactly) when
its recorded settings match, else from scratch; if resuming fails it is retried once from scratch. Exports hash the
identity of the finished run they came from, so a retrained run is exported again. Settings that do not change a
result (``isolate``, ``eval_batch_size``, ``keep_exports``, where the sweep lives) are not hashed; neither is the
library's code: after changing it, delete the points to recompute.

Finally ``sweep_results.json`` (every point and the aggregates over seeds), ``sweep.md`` (the tables) and the
figures (:mod:`.sweep_plots`) are written to ``output_dir``, and the results document (:mod:`.results_doc`) to
``results_doc``. The keys of ``sweep_results.json``:

- ``runs``: per run ``id, condition, setting, gap, drift_lambda, drift_margin, seed, steps, target_weights, flips,
  flip_rate, near_zero_fraction, geometric_tail_ratio, tail_ratios, crossing_histogram, flip_history,
  perplexity`` (``evaluate_folder``), ``trainer_eval_perplexity, resumed_from, train_s, eval_s``;
- ``exports``: per export ``id, run, setting, signs, budget, status`` (``ok`` or ``infeasible`` with ``error``) and,
  when ok, ``bpw, sign_bpw, magnitude_bpw, other_bpw, flips, bits_per_parameter, perplexity, export_s, eval_s``
  (``signs``: "seed" or "packed" for the projections' exports, "file" for the whole-file ones, whose ``budget`` is
  in bits per parameter);
- ``analyses``: per analysed run ``run, analysis`` (the ``analysis.json`` path) and its ``total``;
- ``groups`` / ``export_groups``: per setting (and signs and budget) ``{mean, min, max, std, n}`` of each metric over
  the seeds; ``spec``, ``points`` (total, done), ``compute_s``, ``timing`` (this call), ``figures``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from ..constants import STATE_NAME, STATS_NAME
from ..errors import BudgetError, RecipeError, SignLockConfigError, SignLockError
from ..paths import replaced_whole
from ..yaml_mapping import did_you_mean, read_yaml_mapping

logger = logging.get_logger(__name__)

CONDITIONS = ("baseline", "gap", "drift", "gap_drift")
DRIFT_CONDITIONS = ("drift", "gap_drift")
POINT_NAME = "sweep_point.json"  # a point's result: exists only once the point is complete
SETTINGS_NAME = "sweep_settings.json"  # a training run's settings, written before it starts (for resuming)
RESULTS_NAME, TABLE_NAME = "sweep_results.json", "sweep.md"
# the sweep sets these itself for every run; an override would make every point the same
CONTROLLED_KEYS = ("output_dir", "seed", "gap", "drift_lambda", "drift_margin", "resume_from_checkpoint")


class SweepPointError(SignLockError, RuntimeError):
    """A point of a sweep failed (a training subprocess exited with an error); its log is named."""


@dataclass
class SweepSpec:
    """The grid of a sweep: the keys of a sweep YAML file; the defaults are ``recipes/sweep.yaml``'s grid."""

    base_recipe: str = "quickstart.yaml"  # relative: to the sweep file's folder, then to the current directory
    output_dir: str = "runs/sweep"
    overrides: dict = field(default_factory=dict)  # recipe keys set for every run (max_steps, save_steps...)
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    gap: float = 1.0  # the gap of the `gap` and `gap_drift` runs, in init stds
    drift_lambdas: list[float] = field(default_factory=lambda: [10.0, 30.0, 100.0, 300.0, 1000.0])
    drift_margins: list[float] = field(default_factory=lambda: [0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    headline: dict = field(default_factory=lambda: {"drift_lambda": 300.0, "drift_margin": 1.0})
    replicate_seeds: list[int] = field(default_factory=lambda: [1, 2])
    replicate_conditions: list[str] = field(default_factory=lambda: ["baseline", "gap", "gap_drift"])
    codec: str = "vq"
    codec_params: dict | None = None
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5])
    packed_budgets: list[float] = field(default_factory=lambda: [1.25, 1.5, 2.0])
    packed_conditions: list[str] = field(default_factory=lambda: ["baseline"])
    file_budgets: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.5])  # bits per parameter
    refine_steps: int = 0
    keep_exports: bool = False  # False: an export's weights are deleted once evaluated (bpw.json and results stay)
    analyze: list[str] = field(default_factory=lambda: ["baseline", "gap_drift"])
    analyze_sample: int | None = None
    extra_analyses: list[str] = field(default_factory=list)  # analysis.json files of other models, for the doc
    results_doc: str | None = None  # default: <output_dir>/results.md
    eval_batch_size: int = 16
    isolate: bool = True  # train each run in its own `python -m hf_signlock train` process
    spec_dir: str | None = field(default=None, repr=False)  # where the sweep file is (set by read_sweep)

    def __post_init__(self):
        self.validate()

    # --- checks ---------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Refuse empty grids, non-positive budgets, unknown conditions and a headline outside the grid."""
        for name in ("conditions", "seeds", "budgets"):
            if not getattr(self, name):
                raise SignLockConfigError(f"Sweep `{name}` is empty: give at least one value.")
        for name in ("conditions", "replicate_conditions", "packed_conditions", "analyze"):
            values = getattr(self, name)
            if not isinstance(values, list):
                raise SignLockConfigError(f"Sweep `{name}` must be a list, got {values!r}.")
            for value in values:
                if value not in CONDITIONS:
                    raise SignLockConfigError(f"Sweep `{name}` names an unknown condition {value!r}"
                                              f"{did_you_mean(value, CONDITIONS)}; the conditions are {CONDITIONS}.")
        for name in ("seeds", "replicate_seeds"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise SignLockConfigError(f"Sweep `{name}` must be a list of integers, got {values!r}.")
        for name in ("budgets", "packed_budgets", "file_budgets", "drift_lambdas", "drift_margins"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                raise SignLockConfigError(f"Sweep `{name}` must be a list of numbers, got {values!r}.")
            setattr(self, name, list(dict.fromkeys(float(v) for v in values)))  # duplicates would be the same point
        for name in ("budgets", "packed_budgets", "file_budgets"):
            bad = [b for b in getattr(self, name) if not b > 0 or not math.isfinite(b)]
            if bad:
                raise SignLockConfigError(f"Sweep `{name}` must hold budgets > 0 bits per weight, got {bad}.")
        if self.packed_conditions and not self.packed_budgets:
            raise SignLockConfigError("Sweep `packed_budgets` is empty while `packed_conditions` names runs to "
                                      "export with packed signs: give budgets, or set `packed_conditions: []`.")
        if any(c in DRIFT_CONDITIONS for c in self.conditions):
            for name in ("drift_lambdas", "drift_margins"):
                if not getattr(self, name):
                    raise SignLockConfigError(f"Sweep `{name}` is empty but `conditions` has drift runs.")
        if any(v <= 0 for v in self.drift_lambdas):
            raise SignLockConfigError(f"Sweep `drift_lambdas` must be > 0 (lambda 0 is `baseline` or `gap`), got "
                                      f"{self.drift_lambdas}.")
        if any(v < 0 for v in self.drift_margins):
            raise SignLockConfigError(f"Sweep `drift_margins` must be >= 0, got {self.drift_margins}.")
        if not (_is_number(self.gap) and self.gap > 0):
            raise SignLockConfigError(f"Sweep `gap` must be > 0 (gap 0 is `baseline` or `drift`), got {self.gap!r}.")
        self.seeds = list(dict.fromkeys(self.seeds))
        self.replicate_seeds = [s for s in dict.fromkeys(self.replicate_seeds) if s not in self.seeds]
        if not isinstance(self.headline, dict) or set(self.headline) != {"drift_lambda", "drift_margin"}:
            raise SignLockConfigError(f"Sweep `headline` must be {{drift_lambda: L, drift_margin: M}}, got "
                                      f"{self.headline!r}.")
        headline = {k: float(v) for k, v in self.headline.items()}
        outside = (headline["drift_lambda"] not in self.drift_lambdas
                   or headline["drift_margin"] not in self.drift_margins)
        if any(c in DRIFT_CONDITIONS for c in self.conditions) and outside:
            raise SignLockConfigError(
                f"Sweep `headline` {headline} is not in the grid (drift_lambdas {self.drift_lambdas}, drift_margins "
                f"{self.drift_margins}): add it to the grid or pick one of its points.")
        self.headline = headline
        if not isinstance(self.overrides, dict):
            raise SignLockConfigError(f"Sweep `overrides` must be a mapping of recipe keys, got {self.overrides!r}.")
        controlled = sorted(set(self.overrides) & set(CONTROLLED_KEYS))
        if controlled:
            raise SignLockConfigError(
                f"Sweep `overrides` sets {controlled}, which the sweep sets for every point; use the sweep's own keys "
                "(`gap`, `drift_lambdas`, `drift_margins`, `seeds`, `output_dir`).")
        if not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise SignLockConfigError(f"Sweep `refine_steps` must be an integer >= 0, got {self.refine_steps!r}.")
        if self.analyze_sample is not None and (not isinstance(self.analyze_sample, int) or self.analyze_sample < 1):
            raise SignLockConfigError(f"Sweep `analyze_sample` must be None or >= 1, got {self.analyze_sample!r}.")
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise SignLockConfigError(f"Sweep `eval_batch_size` must be >= 1, got {self.eval_batch_size!r}.")

    # --- paths ----------------------------------------------------------------------------------------------------

    def recipe_path(self) -> Path:
        """The base recipe: relative to the sweep file's folder if it is there, else to the current directory."""
        path = Path(self.base_recipe)
        if not path.is_absolute() and self.spec_dir is not None and (Path(self.spec_dir) / path).is_file():
            return Path(self.spec_dir) / path
        if not path.is_file():
            raise RecipeError(f"Sweep `base_recipe` {self.base_recipe!r} does not exist (looked in "
                              f"{self.spec_dir or '.'} and the current directory).")
        return path

    def doc_path(self) -> Path:
        """Where the results document goes."""
        return Path(self.results_doc) if self.results_doc else Path(self.output_dir) / "results.md"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_sweep(path: str | os.PathLike, **overrides) -> SweepSpec:
    """The :class:`SweepSpec` of a sweep YAML file (``overrides``: keys set from the command line, e.g. output_dir).

    Unknown keys are refused with the closest known key named; empty grids and budgets <= 0 are refused too."""
    path = Path(path)
    known = [f.name for f in dataclasses.fields(SweepSpec) if f.name != "spec_dir"]
    values = read_yaml_mapping(path, "Sweep file", "`key: value`", known,
                               f"The keys are: {', '.join(known)} (see recipes/sweep.yaml).")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SweepSpec(**values, spec_dir=str(path.parent))


# --- points -----------------------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class RunPoint:
    """One training run of the grid."""

    condition: str
    gap: float
    drift_lambda: float
    drift_margin: float
    seed: int

    @property
    def setting(self) -> str:
        """The run's id without its seed (what the seeds of one setting share)."""
        if self.condition == "baseline":
            return "baseline"
        if self.condition == "gap":
            return f"gap{_num(self.gap)}"
        name = "drift" if self.condition == "drift" else f"gap{_num(self.gap)}-drift"
        return f"{name}-l{_num(self.drift_lambda)}-m{_num(self.drift_margin)}"

    @property
    def id(self) -> str:
        """Folder name: the setting and the seed."""
        return f"{self.setting}-s{self.seed}"

    def flags(self) -> list[str]:
        """The ``hf-signlock train`` flags that make the base recipe this run (output_dir aside)."""
        return ["--gap", _num(self.gap), "--drift_lambda", _num(self.drift_lambda), "--drift_margin",
                _num(self.drift_margin), "--seed", str(self.seed)]


@dataclass(frozen=True)
class ExportPoint:
    """One export of a run at one budget: the block projections with seeded signs and coded flips, or packed 1-bit
    signs (``budget`` in bits per target weight), or the whole file (``budget`` in bits per parameter)."""

    run: RunPoint
    signs: str  # "seed", "packed" or "file"
    budget: float

    @property
    def id(self) -> str:
        """Folder path below ``exports/``."""
        return f"{self.run.id}/{self.signs}-{_num(self.budget)}{'bpp' if self.signs == 'file' else 'bpw'}"


@dataclass(frozen=True)
class AnalysisPoint:
    """The sign analysis (``analyze``) of a run."""

    run: RunPoint

    @property
    def id(self) -> str:
        """Folder name below ``analysis/``."""
        return self.run.id


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, value: dict) -> None:
    """Write then rename: a reader (a resumed sweep) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(path) as partial:
        partial.write_text(json.dumps(value, indent=2, default=str))


def _finite(value):
    """JSON has no NaN: non-finite floats become None, in nested lists and dicts too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --- training --------------------------------------------------------------------------------------------------------


def train_run(recipe: Path, flags: list[str], log_path: Path, isolate: bool = True) -> None:
    """Train the base ``recipe`` with ``flags`` (ending with ``--output_dir``); output to ``log_path``.

    ``isolate``: in a ``python -m hf_signlock train`` subprocess (its memory is returned when it ends, and a crash
    ends only it), else in this process. Raises :class:`SweepPointError` naming the log when the training fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if isolate:
        command = [sys.executable, "-m", "hf_signlock", "train", "--config", str(recipe), *flags]
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False,
                                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if result.returncode != 0:
            lines = [line for line in log_path.read_text().splitlines() if line.strip()]
            last = lines[-1].strip() if lines else ""  # the error line of `hf-signlock train` or a traceback's
            raise SweepPointError(f"training failed (exit {result.returncode}): {last[:300]} (log {log_path})")
        return
    from ..training.recipe import parse_recipe
    from ..training.run import run_training

    with open(log_path, "w") as log:
        log.write(f"in-process: --config {recipe} {' '.join(flags)}\n")
    try:
        run_training(*parse_recipe(recipe, flags))
    except Exception as error:
        with open(log_path, "a") as log:
            log.write(f"{type(error).__name__}: {error}\n")
        raise SweepPointError(f"training failed: {type(error).__name__}: {error} (log {log_path})") from error


def _training_finished(folder: Path) -> bool:
    """The run's model and stats are complete: ``run_training`` adds the data settings to the stats last."""
    stats = _read_json(folder / STATS_NAME)
    return bool(stats and "data" in stats and (folder / "config.json").exists())


def _last_checkpoint(folder: Path) -> Path | None:
    """The run's latest complete Trainer checkpoint, if any."""
    checkpoints = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    # SignLockTrainer writes its tracking state after the Trainer's files: a checkpoint without it is half-written
    complete = [p for p in checkpoints if (p / STATE_NAME).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _summary(values: Sequence[float | None]) -> dict | None:
    """Mean, min, max, sample std and count of the values that exist (None if none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


# --- the sweep -------------------------------------------------------------------------------------------------------


class Sweep:
    """The points of a :class:`SweepSpec` and their computation, skipping finished points.

    ``sweep = Sweep(read_sweep("recipes/sweep.yaml")); sweep.run()`` trains, exports, evaluates and analyses what is
    not done yet, then writes the tables, figures and results document; ``sweep.status()`` lists the points."""

    def __init__(self, spec: SweepSpec):
        from ..training.recipe import as_flags

        self.spec = spec
        self.root = Path(spec.output_dir)
        self.recipe = spec.recipe_path()
        self._recipe_sha = hashlib.sha256(self.recipe.read_bytes()).hexdigest()[:16]
        self._override_flags = as_flags(spec.overrides)
        self._check_overrides()
        self.failures: list[tuple[str, str]] = []

    def _check_overrides(self) -> None:
        """Unknown or ill-typed ``overrides`` and an unknown codec or codec parameter stop the sweep before anything
        is trained."""
        from ..training.recipe import field_names, parse_recipe

        known = field_names()
        for key in self.spec.overrides:
            if key not in known:
                raise RecipeError(f"Sweep `overrides` has an unknown recipe key {key!r}{did_you_mean(key, known)}; "
                                  "keys are fields of `hf-signlock train --help`.")
        probe = RunPoint("gap_drift", self.spec.gap, 1.0, 1.0, self.spec.seeds[0])
        parse_recipe(self.recipe, [*self.run_flags(probe), "--output_dir", str(self.root / "runs" / "probe")])
        from ..quantization.codecs import make_codec

        # a bad codec or parameter now, so that an export's SignLockConfigError later can only be a budget it misses
        make_codec(self.spec.codec, self.spec.codec_params)

    # --- the grid -----------------------------------------------------------------------------------------------

    def runs(self) -> list[RunPoint]:
        """Every training run: each condition's settings at ``seeds``, the replicated ones also at
        ``replicate_seeds``."""
        spec, runs = self.spec, []
        headline = (spec.headline["drift_lambda"], spec.headline["drift_margin"])
        for condition in spec.conditions:
            gap = spec.gap if condition in ("gap", "gap_drift") else 0.0
            if condition in DRIFT_CONDITIONS:
                settings = [(lam, m) for lam in spec.drift_lambdas for m in spec.drift_margins]
            else:
                settings = [(0.0, headline[1])]  # lambda 0: the margin does nothing; one value keeps ids stable
            for lam, margin in settings:
                seeds = list(spec.seeds)
                if condition in spec.replicate_conditions and (condition not in DRIFT_CONDITIONS
                                                               or (lam, margin) == headline):
                    seeds += spec.replicate_seeds
                runs += [RunPoint(condition, gap, lam, margin, seed) for seed in seeds]
        return runs

    def exports(self, run: RunPoint) -> list[ExportPoint]:
        """The exports of one run: seeded signs at every budget, packed signs for ``packed_conditions``, the whole file
        at every ``file_budgets``."""
        points = [ExportPoint(run, "seed", b) for b in self.spec.budgets]
        if run.condition in self.spec.packed_conditions:
            points += [ExportPoint(run, "packed", b) for b in self.spec.packed_budgets]
        return points + [ExportPoint(run, "file", b) for b in self.spec.file_budgets]

    def analyses(self) -> list[AnalysisPoint]:
        """The runs given to ``analyze``: first seed, headline setting for the drift conditions."""
        headline = (self.spec.headline["drift_lambda"], self.spec.headline["drift_margin"])
        chosen = []
        for run in self.runs():
            if (run.condition in self.spec.analyze and run.seed == self.spec.seeds[0]
                    and (run.condition not in DRIFT_CONDITIONS or (run.drift_lambda, run.drift_margin) == headline)):
                chosen.append(AnalysisPoint(run))
        return chosen

    def points(self) -> list:
        """Every point in the order computed: each run followed by its exports, then the analyses."""
        points = []
        for run in self.runs():
            points += [run, *self.exports(run)]
        return points + self.analyses()

    # --- folders and hashes -------------------------------------------------------------------------------------

    def folder(self, point) -> Path:
        """The folder of a point (its result is ``sweep_point.json`` inside)."""
        if isinstance(point, RunPoint):
            return self.root / "runs" / point.id
        if isinstance(point, ExportPoint):
            return self.root / "exports" / point.id
        return self.root / "analysis" / point.id

    def run_flags(self, run: RunPoint) -> list[str]:
        """The full ``hf-signlock train`` flags of a run: overrides, the point's settings, quiet progress."""
        return [*self._override_flags, *run.flags(), "--disable_tqdm", "true"]

    def settings(self, point) -> dict | None:
        """Everything the point's result depends on; None while the run an export or analysis needs is not done."""
        if isinstance(point, RunPoint):
            return {"kind": "run", "recipe_sha256": self._recipe_sha, "flags": self.run_flags(point)}
        run_result = self.result(point.run)
        if run_result is None:
            return None
        if isinstance(point, ExportPoint):
            return {"kind": "export", "run": run_result["completion"], "signs": point.signs, "budget": point.budget,
                    "codec": self.spec.codec, "codec_params": self.spec.codec_params,
                    "refine_steps": self.spec.refine_steps}
        return {"kind": "analysis", "run": run_result["completion"], "sample": self.spec.analyze_sample}

    def result(self, point) -> dict | None:
        """The point's stored result if it is complete and computed with the current settings, else None."""
        stored = _read_json(self.folder(point) / POINT_NAME)
        if not stored:
            return None
        settings = self.settings(point)
        if settings is None or stored.get("settings_hash") != _settings_hash(settings):
            return None
        return stored

    def status(self) -> list[tuple[object, str]]:
        """``(point, state)`` for every point: ``done``, ``partial (...)`` (a run with a checkpoint) or ``todo``."""
        rows = []
        for point in self.points():
            if self.result(point) is not None:
                state = "done"
            elif isinstance(point, RunPoint) and (checkpoint := self._resumable_checkpoint(point)):
                state = f"partial ({checkpoint.name})"
            else:
                state = "todo"
            rows.append((point, state))
        return rows

    def _resumable_checkpoint(self, point: RunPoint) -> Path | None:
        """The last checkpoint of a run stopped midway, if it was started with the current settings."""
        folder = self.folder(point)
        recorded = _read_json(folder / SETTINGS_NAME)
        if not recorded or recorded.get("settings_hash") != _settings_hash(self.settings(point)):
            return None
        return _last_checkpoint(folder)

    # --- computing ----------------------------------------------------------------------------------------------

    def run(self, progress: bool = True, write_outputs: bool = True) -> dict:
        """Compute every point not done yet, then write ``sweep_results.json``, ``sweep.md``, the figures and the
        results document; returns the results. A failed point is reported (and redone by the next call); the
        others go on. Raises :class:`SweepPointError` at the end if any point failed."""
        from tqdm import tqdm as tqdm_lib

        # the figures need matplotlib, the analyses scipy: fail now, not after an hour of training
        if write_outputs:
            from .sweep_plots import require_matplotlib

            require_matplotlib()
        if self.analyses():
            from .sign_metrics import require_scipy_stats

            require_scipy_stats()
        self.root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        points = self.points()
        bar = logging.tqdm(total=len(points), desc="sweep", unit="point", disable=not progress)
        computed = skipped = 0
        self.failures = []
        for point in points:
            name = f"{type(point).__name__.removesuffix('Point').lower()} {point.id}"
            if self.result(point) is not None:
                skipped += 1
                bar.update(1)
                continue
            if self.settings(point) is None:  # its run failed in this call
                self.failures.append((name, "its run did not finish"))
                bar.update(1)
                continue
            bar.set_postfix_str(name)
            tic = time.perf_counter()
            try:
                with _quiet_progress_bars():
                    result = self._compute(point)
            except SignLockError as error:  # a typed failure of this point (SweepPointError among them); bugs stop
                self.failures.append((name, str(error)))
                tqdm_lib.write(f"[sweep] FAILED {name}: {str(error).splitlines()[0]}")
            else:
                computed += 1
                tqdm_lib.write(f"[sweep] {name}: {_describe(result)} ({time.perf_counter() - tic:.0f} s)")
            bar.update(1)
        bar.close()
        results = self.collect()
        results["timing"] = {"this_call_s": time.perf_counter() - started, "computed": computed, "skipped": skipped,
                             "failed": len(self.failures)}
        if write_outputs:
            self.write_outputs(results)
        if self.failures:
            listing = "\n".join(f"  {name}: {why.splitlines()[0]}" for name, why in self.failures)
            raise SweepPointError(f"{len(self.failures)} sweep points failed (rerun to retry them):\n{listing}")
        return results

    def _compute(self, point) -> dict:
        if isinstance(point, RunPoint):
            return self._compute_run(point)
        if isinstance(point, ExportPoint):
            return self._compute_export(point)
        return self._compute_analysis(point)

    def _finish(self, point, result: dict) -> dict:
        settings = self.settings(point)
        result = {**result, "id": point.id, "settings": settings, "settings_hash": _settings_hash(settings),
                  "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json_atomic(self.folder(point) / POINT_NAME, _finite(result))
        return result

    def _compute_run(self, point: RunPoint) -> dict:
        from .perplexity import evaluate_folder

        folder, settings = self.folder(point), self.settings(point)
        digest = _settings_hash(settings)
        recorded = _read_json(folder / SETTINGS_NAME)
        tic = time.perf_counter()
        resumed_from = None
        if recorded and recorded.get("settings_hash") == digest and _training_finished(folder):
            pass  # trained; the sweep stopped before recording it
        else:
            checkpoint = self._resumable_checkpoint(point)
            if checkpoint is None:
                _reset(folder)
                _write_json_atomic(folder / SETTINGS_NAME, {"settings_hash": digest, "settings": settings})
            flags = [*self.run_flags(point), "--output_dir", str(folder)]
            try:
                if checkpoint is not None:
                    resumed_from = checkpoint.name
                    train_run(self.recipe, [*flags, "--resume_from_checkpoint", str(checkpoint)],
                              folder / "train.log", self.spec.isolate)
                else:
                    train_run(self.recipe, flags, folder / "train.log", self.spec.isolate)
            except SweepPointError:
                if checkpoint is None:
                    raise
                logger.warning(f"Resuming {folder} from {checkpoint.name} failed; training it again from scratch.")
                resumed_from = None
                _reset(folder)
                _write_json_atomic(folder / SETTINGS_NAME, {"settings_hash": digest, "settings": settings})
                train_run(self.recipe, flags, folder / "train.log", self.spec.isolate)
        train_s = time.perf_counter() - tic
        stats = json.loads((folder / STATS_NAME).read_text())
        tic = time.perf_counter()
        evaluation = evaluate_folder(folder, batch_size=self.spec.eval_batch_size, write=False)
        for checkpoint in folder.glob("checkpoint-*"):  # the run is complete: only resuming needed them
            shutil.rmtree(checkpoint, ignore_errors=True)
        return self._finish(point, {
            "kind": "run", "condition": point.condition, "setting": point.setting, "gap": point.gap,
            "drift_lambda": point.drift_lambda, "drift_margin": point.drift_margin, "seed": point.seed,
            "steps": stats.get("global_step"), "target_weights": stats.get("target_weights"),
            "flips": stats.get("flips"), "flip_rate": stats.get("flip_rate"),
            "near_zero_fraction": stats.get("near_zero_fraction"),
            "geometric_tail_ratio": stats.get("geometric_tail_ratio"), "tail_ratios": stats.get("tail_ratios"),
            "crossing_histogram": stats.get("crossing_histogram"),
            "flip_history": [(h["step"], h["flip_rate"]) for h in stats.get("history", []) if "flip_rate" in h],
            "trainer_eval_perplexity": stats.get("eval_perplexity"),
            "perplexity": evaluation["perplexity"], "eval_tokens": evaluation.get("tokens"),
            "dataset": evaluation.get("dataset"), "resumed_from": resumed_from,
            "train_s": train_s, "eval_s": time.perf_counter() - tic,
            "completion": uuid.uuid4().hex,  # exports and analyses of this training hash it
        })

    def _compute_export(self, point: ExportPoint) -> dict:
        from ..quantization.export import export_run
        from .perplexity import evaluate_folder

        folder = self.folder(point)
        _reset(folder)
        tic = time.perf_counter()
        common = {"kind": "export", "run": point.run.id, "condition": point.run.condition,
                  "setting": point.run.setting, "gap": point.run.gap, "drift_lambda": point.run.drift_lambda,
                  "drift_margin": point.run.drift_margin, "seed": point.run.seed, "signs": point.signs,
                  "budget": point.budget}
        try:
            whole = point.signs == "file"  # the whole file, at bits per parameter; else the projections alone
            report = export_run(self.folder(point.run), folder, codec=self.spec.codec,
                                codec_params=self.spec.codec_params,
                                bits_per_weight=None if whole else point.budget,
                                bits_per_parameter=point.budget if whole else None, target_embeddings=whole,
                                sign_source="packed" if point.signs == "packed" else None,
                                refine_steps=self.spec.refine_steps)
        except BudgetError as error:
            # the codec cannot meet the budget: a result (the same every time), not a failure
            return self._finish(point, {**common, "status": "infeasible", "error": str(error),
                                        "export_s": time.perf_counter() - tic})
        except SignLockConfigError as error:
            raise SweepPointError(f"export failed: {error}") from error
        export_s = time.perf_counter() - tic
        tic = time.perf_counter()
        evaluation = evaluate_folder(folder, batch_size=self.spec.eval_batch_size, write=False)
        total = report["total"]
        weights = total["weights"]
        if not self.spec.keep_exports:  # the numbers are kept; the weights of dozens of exports are not
            for path in folder.iterdir():
                if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
                    path.unlink()
        return self._finish(point, {
            **common, "status": "ok", "bpw": report["bpw"], "sign_bpw": total["sign_bits"] / weights,
            "magnitude_bpw": total["magnitude_bits"] / weights, "other_bpw": total["other_bits"] / weights,
            "flips": total.get("flips"), "weights": weights,
            "bits_per_parameter": report.get("checkpoint", {}).get("bits_per_parameter"),
            "perplexity": evaluation["perplexity"], "export_s": export_s, "eval_s": time.perf_counter() - tic,
        })

    def _compute_analysis(self, point: AnalysisPoint) -> dict:
        from .analyze import analyze

        folder = self.folder(point)
        _reset(folder)
        tic = time.perf_counter()
        result = analyze(str(self.folder(point.run)), output_dir=str(folder), sample=self.spec.analyze_sample)
        return self._finish(point, {
            "kind": "analysis", "run": point.run.id, "condition": point.run.condition,
            "setting": point.run.setting, "seed": point.run.seed, "analysis": str(folder / "analysis.json"),
            "total": result.get("total"), "analyze_s": time.perf_counter() - tic,
        })

    # --- results ------------------------------------------------------------------------------------------------

    def collect(self) -> dict:
        """Every finished point's result and the aggregates over seeds (what ``sweep_results.json`` holds)."""
        runs, exports, analyses = [], [], []
        for point in self.points():
            result = self.result(point)
            if result is None:
                continue
            {"run": runs, "export": exports, "analysis": analyses}[result["kind"]].append(result)
        return {
            "spec": {k: v for k, v in dataclasses.asdict(self.spec).items() if k != "spec_dir"},
            "base_recipe": str(self.recipe), "output_dir": str(self.root),
            "points": {"total": len(self.points()), "done": len(runs) + len(exports) + len(analyses)},
            "runs": runs, "exports": exports, "analyses": analyses,
            "groups": aggregate_runs(runs), "export_groups": aggregate_exports(exports),
            "compute_s": sum(r.get("train_s", 0) + r.get("eval_s", 0) + r.get("export_s", 0) + r.get("analyze_s", 0)
                             for r in runs + exports + analyses),
        }

    def write_outputs(self, results: dict) -> dict:
        """``sweep_results.json``, ``sweep.md``, the figures and the results document; returns their paths."""
        from .results_doc import write_results_doc
        from .sweep_plots import plot_sweep

        figures = plot_sweep(results, self.root)
        results["figures"] = [str(p) for p in figures]
        _write_json_atomic(self.root / RESULTS_NAME, _finite(results))
        (self.root / TABLE_NAME).write_text(sweep_table(results))
        doc = write_results_doc(results, self.spec.doc_path(), figures=figures,
                                extra_analyses=self.spec.extra_analyses)
        return {"results": self.root / RESULTS_NAME, "table": self.root / TABLE_NAME, "figures": figures, "doc": doc}


def _reset(folder: Path) -> None:
    """Empty a point's folder (what a stopped computation left)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


@contextlib.contextmanager
def _quiet_progress_bars():
    """Silence the bars of export and evaluation inside a point (the sweep's own bar was created before)."""
    import datasets

    was_enabled = logging.is_progress_bar_enabled()
    datasets_were_enabled = datasets.is_progress_bar_enabled()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()  # tokenising and grouping the held-out text
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
        if datasets_were_enabled:
            datasets.enable_progress_bars()


def _describe(result: dict) -> str:
    if result["kind"] == "run":
        resumed = f", resumed from {result['resumed_from']}" if result["resumed_from"] else ""
        return (f"flip rate {result['flip_rate']:.3g}, perplexity {result['perplexity']:.3f} "
                f"({result['steps']} steps{resumed})")
    if result["kind"] == "export":
        if result["status"] != "ok":
            return "infeasible at this budget"
        return f"{result['bpw']:.4f} bpw (signs {result['sign_bpw']:.4f}), perplexity {result['perplexity']:.3f}"
    total = result.get("total") or {}
    return (f"analysis: {total.get('layers_rejected', '-')} of {total.get('layers_tested', '-')} layers reject "
            "Rademacher")


# --- aggregates and the table ---------------------------------------------------------------------------------------


RUN_METRICS = ("flip_rate", "perplexity", "geometric_tail_ratio", "near_zero_fraction")


def aggregate_runs(runs: list[dict]) -> list[dict]:
    """Per setting (condition, gap, lambda, margin): each metric's mean, min, max, std over its seeds."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["setting"], []).append(run)
    rows = []
    for setting, members in groups.items():
        first = members[0]
        row = {"setting": setting, **{k: first[k] for k in ("condition", "gap", "drift_lambda", "drift_margin")},
               "seeds": [m["seed"] for m in members], "steps": first.get("steps"),
               "target_weights": first.get("target_weights")}
        row.update({metric: _summary([m.get(metric) for m in members]) for metric in RUN_METRICS})
        rows.append(row)
    return rows


def aggregate_exports(exports: list[dict]) -> list[dict]:
    """Per (setting, signs, budget): bits and perplexity over the seeds whose export met the budget."""
    groups: dict[tuple, list[dict]] = {}
    for export in exports:
        groups.setdefault((export["setting"], export["signs"], export["budget"]), []).append(export)
    rows = []
    for (setting, signs, budget), members in groups.items():
        ok = [m for m in members if m["status"] == "ok"]
        first = members[0]
        row = {"setting": setting, "signs": signs, "budget": budget,
               **{k: first[k] for k in ("condition", "gap", "drift_lambda", "drift_margin")},
               "seeds": [m["seed"] for m in members], "feasible": len(ok), "infeasible": len(members) - len(ok)}
        for metric in ("bpw", "sign_bpw", "magnitude_bpw", "other_bpw", "bits_per_parameter", "perplexity"):
            row[metric] = _summary([m.get(metric) for m in ok])
        rows.append(row)
    return rows


def _cell(summary: dict | None, spec: str = ".4g") -> str:
    if summary is None:
        return "-"
    if summary["n"] == 1:
        return format(summary["mean"], spec)
    return f"{format(summary['mean'], spec)} [{format(summary['min'], spec)}, {format(summary['max'], spec)}]"


def sweep_table(results: dict) -> str:
    """``sweep.md``: the runs and exports aggregated over seeds (mean [min, max] where there are several)."""
    lines = [f"# Sweep: {results['output_dir']}", "",
             (f"Base recipe `{results['base_recipe']}`; {results['points']['done']} of {results['points']['total']} "
              f"points done; compute {results.get('compute_s', 0) / 60:.1f} min in all. Mean [min, max] over "
              "seeds."), "",
             "## Training runs", "",
             "| setting | gap | lambda | margin | seeds | steps | flip rate | perplexity | tail ratio | near-zero |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for g in results["groups"]:
        lines.append(f"| {g['setting']} | {_num(g['gap'])} | {_num(g['drift_lambda'])} | {_num(g['drift_margin'])} | "
                     f"{','.join(map(str, g['seeds']))} | {g['steps']} | {_cell(g['flip_rate'], '.3g')} | "
                     f"{_cell(g['perplexity'], '.2f')} | {_cell(g['geometric_tail_ratio'], '.3f')} | "
                     f"{_cell(g['near_zero_fraction'], '.3g')} |")
    lines += ["", "## Exports", "", ("Signs `seed` and `packed`: the block projections, budget and bpw in total bits per "
                                     "target weight, everything counted (`bpw.json`). Signs `file`: the whole file "
                                     "(embeddings and head compressed too), budget in bits per parameter of every byte "
                                     "of the weight files and config; bpw is then over all its target weights."),
              "", "| setting | signs | budget | seeds | bpw | sign bpw | bits per parameter | perplexity |",
              "|---|---|---:|---|---:|---:|---:|---:|"]
    for g in sorted(results["export_groups"], key=lambda g: (g["setting"], g["signs"], g["budget"])):
        if not g["feasible"]:
            lines.append(f"| {g['setting']} | {g['signs']} | {_num(g['budget'])} | {','.join(map(str, g['seeds']))} "
                         "| infeasible | - | - | - |")
            continue
        note = f" ({g['infeasible']} infeasible)" if g["infeasible"] else ""
        seeds = ",".join(map(str, g["seeds"]))
        lines.append(f"| {g['setting']} | {g['signs']} | {_num(g['budget'])} | {seeds}{note} | "
                     f"{_cell(g['bpw'])} | {_cell(g['sign_bpw'], '.3g')} | {_cell(g.get('bits_per_parameter'))} | "
                     f"{_cell(g['perplexity'], '.2f')} |")
    if results.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["figures"]]
    return "\n".join(lines) + "\n"


def describe_status(sweep: Sweep) -> str:
    """The ``--dry_run`` listing: every point, its folder and whether it is done."""
    rows = sweep.status()
    done = sum(state == "done" for _, state in rows)
    lines = [f"{len(rows)} points ({done} done, {len(rows) - done} to compute) in {sweep.root}:"]
    for point, state in rows:
        kind = type(point).__name__.removesuffix("Point").lower()
        lines.append(f"  [{state}] {kind:8s} {point.id}")
    return "\n".join(lines)


def run_sweep(config: str | os.PathLike, output_dir: str | None = None, progress: bool = True) -> dict:
    """Read a sweep file and run it (see :class:`Sweep`); ``output_dir`` overrides the file's."""
    return Sweep(read_sweep(config, output_dir=output_dir)).run(progress=progress)
