"""``export_run``: a trained model folder -> a SignLock checkpoint folder (model, tokenizer, ``bpw.json``).

The seed, sign source and targets come from the run's ``signlock_stats.json``: a run fine-tuned from a pretrained
model stores its signs as flips against that base model's (``sign_source="base"``); a folder without one (any dense
or Hub model) is exported with ``packed`` signs, 1 bit each, and says so, unless ``base_model`` names its base.
The token embedding and an untied LM head are compressed too when the run trained them as targets, for a fine-tune
(their signs against the base's) and for a folder without a run (packed signs); the tensors that stay dense (norms)
are stored in bf16 unless ``dtype`` says otherwise. ``bits_per_parameter`` budgets the whole file (``budget.py``).
With ``refine_steps`` the codec tables are trained on the run's own training text, every sign fixed (``refine.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging

from ..constants import STATS_NAME, TRAINING_STATS_NAME
from ..errors import BudgetError, SignLockConfigError
from ..paths import check_model_folder
from ..targets import find_target_modules
from .bits import write_bits_report
from .budget import bits_per_weight_for_file
from .calibration import CalibrationArguments, calibration_windows, collect_hessians, hessian_inputs
from .codecs import make_codec
from .config import SignLockConfig
from .quantize import quantize_model

logger = logging.get_logger(__name__)
REFINE_LOSSES = ("lm", "teacher")
MIN_SIGNMAG_BITS = 2.0  # magnitude bits a weight from which the default codec is signmag


def signs_of_run(run_dir: str | os.PathLike, model=None) -> dict:
    """Seed and sign source of a training run, from its ``signlock_stats.json``: a run fine-tuned from a pretrained
    model (captured signs) stores its signs against that model's (``base``, with ``base_model``); ``packed`` signs
    (with the reason) when the run was not trained from our seeded init and names no starting model. Given the
    run's ``model``, targets that are the default ones come back as None: the checkpoint's config then names no
    modules (a list costs about 40 bytes a layer). ``target_embeddings``: whether the embedding and an untied head
    are compressed too: where the run trained them as targets, and wherever their signs cost the same as the other
    targets' (packed signs, or flips against a base, which a fine-tune keeps whether it tracked them or not)."""
    path = Path(run_dir, STATS_NAME)
    if not path.exists():
        return {"sign_source": "packed", "target_embeddings": True,
                "why": f"{path} is missing: not a SignLockTrainer run"}
    stats = json.loads(path.read_text())
    if stats.get("reference_mode") not in ("seed", "captured"):
        return {"sign_source": "packed", "target_embeddings": True, "why": "the run records no reference mode"}
    if stats["reference_mode"] == "captured" and not stats.get("model_name_or_path"):
        return {"sign_source": "packed", "target_embeddings": True,
                "why": "the run fine-tuned from captured signs and does not record the model it started from (pass "
                "base_model to store its signs against that model's)"}
    trained_embeddings = bool(stats.get("target_embeddings", False))
    modules = [name.removesuffix(".weight") for name in stats.get("target_modules", [])]
    if model is not None:
        embeddings = {name for name in find_target_modules(model, None, True)} - set(find_target_modules(model))
        modules = [name for name in modules if name not in embeddings]
        if modules == list(find_target_modules(model)):
            modules = None
    if stats["reference_mode"] == "captured":  # the starting signs are the pretrained model's own
        return {"sign_source": "base", "base_model": stats["model_name_or_path"], "target_modules": modules or None,
                "target_embeddings": True}
    return {"sign_source": stats.get("sign_source", "seed"), "seed": stats["seed"],
            "template_rank": stats.get("template_rank", 8), "target_modules": modules or None,
            "target_embeddings": trained_embeddings}


def default_codec(bits_per_weight: float | None, sign_source: str) -> str:
    """The codec an export uses when none is named: ``signmag`` (calibrated scalar levels) where the budget leaves
    the magnitudes 2 bits a weight or more once packed signs are paid, ``vq`` (codebooks over groups) below that,
    where scalar codes cannot go (sub-bit magnitudes)."""
    if bits_per_weight is None:
        return "vq"
    sign_bits = 1.0 if sign_source == "packed" else 0.0  # flips against a seed or base: a small fraction of a bit
    return "signmag" if bits_per_weight - sign_bits >= MIN_SIGNMAG_BITS else "vq"


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, codec: str | None = None,
               codec_params: dict | None = None, bits_per_weight: float | None = None,
               bits_per_parameter: float | None = None, target_embeddings: bool | None = None,
               sign_source: str | None = None, dequantize: bool | None = None, refine_steps: int = 0,
               refine_learning_rate: float = 3e-3, refine_loss: str = "lm", dtype: str | None = None, data_args=None,
               base_model: str | None = None, base_revision: str | None = None,
               calibration: CalibrationArguments | None = None, overwrite: bool = False) -> dict:
    """Compress a trained model folder into ``out_dir`` (model, tokenizer, ``bpw.json``); returns the bits report.

    The arguments are ``SignLockConfig``'s (``bits_per_weight`` None: the codec's default budget, 1.0 for vq) and
    refinement's (``refine_steps`` of AdamW at ``refine_learning_rate`` on the LM loss, or with
    ``refine_loss="teacher"`` on the KL divergence from the dense model). ``bits_per_parameter`` instead budgets the
    whole file, every byte of it over the model's parameters (``budget.py``). ``target_embeddings`` None: what
    ``signs_of_run`` says. ``dtype`` ("bfloat16", the default, "float16", "float32") is the dtype of the tensors
    that stay dense (norms, biases, embeddings that are not targets); the codecs read the run's weights as trained.
    ``codec`` None: ``default_codec``. A codec that uses calibration (``signmag``) gets each layer's input Hessian
    from ``calibration`` (default ``CalibrationArguments()``: 64 windows of 256 tokens from the run's training text,
    else the built-in corpus; ``samples=0`` turns it off); a token embedding tied to the head gets the head's.
    ``base_model`` (a folder, Hub id or sign pack, at ``base_revision``) stores the signs as flips against that
    model's (``sign_source="base"``, the default then); a run fine-tuned from a pretrained model (captured signs)
    does so against the model it records having started from. The export is written to a temporary folder beside
    ``out_dir`` and moved into place when complete; an existing non-empty ``out_dir`` (or the run folder itself)
    is replaced only with ``overwrite``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if refine_loss not in REFINE_LOSSES:
        raise SignLockConfigError(f"`refine_loss` must be 'lm' or 'teacher' (the dense model), got {refine_loss!r}.")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise SignLockConfigError(f"`dtype` must be float32, bfloat16 or float16, got {dtype!r}.")
    if bits_per_weight is not None and bits_per_parameter is not None:
        raise SignLockConfigError("Give `bits_per_weight` (the target layers' budget) or `bits_per_parameter` (the "
                                  "whole file's), not both.")
    for name, value in (("bits_per_weight", bits_per_weight), ("bits_per_parameter", bits_per_parameter)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise SignLockConfigError(f"`{name}` must be a finite number > 0, got {value!r}.")
    if codec_params is not None:  # types and names checked before any work, not after loading and calibrating
        SignLockConfig(sign_source="packed", codec=codec or "vq", codec_params=codec_params)
    save_dtype = getattr(torch, dtype or "bfloat16")
    check_model_folder(run_dir, "RUN_DIR")
    check_destination(run_dir, out_dir, overwrite)
    model = AutoModelForCausalLM.from_pretrained(run_dir, dtype="auto")
    signs = signs_of_run(run_dir, model)
    if signs["sign_source"] == "packed" and sign_source is None and base_model is None:
        logger.warning(f"Exporting {run_dir} with packed signs (1 bit per weight): {signs['why']}.")
    sign_source = sign_source or ("base" if base_model else signs["sign_source"])
    target_embeddings = signs["target_embeddings"] if target_embeddings is None else target_embeddings
    budget = None
    if bits_per_parameter is not None:
        targets = find_target_modules(model, signs.get("target_modules"), target_embeddings)
        bits_per_weight, budget = bits_per_weight_for_file(model, targets, bits_per_parameter, save_dtype)
    config = SignLockConfig(
        seed=signs.get("seed"), sign_source=sign_source,
        template_rank=signs.get("template_rank", 8), target_modules=signs.get("target_modules"),
        target_embeddings=target_embeddings, codec=codec or default_codec(bits_per_weight, sign_source),
        codec_params=codec_params, bits_per_weight=bits_per_weight, dequantize=dequantize,
        base_model=base_model or signs.get("base_model"), base_revision=base_revision,
    )
    hessians = None
    if make_codec(config.codec, config.codec_params).calibrated:
        calibration = calibration or CalibrationArguments()
        if calibration.samples:
            windows = calibration_windows(AutoTokenizer.from_pretrained(run_dir), calibration, run_dir)
            targets = find_target_modules(model, config.target_modules, config.target_embeddings)
            hessians = collect_hessians(model, windows, hessian_inputs(model, targets), calibration.batch_size)
    try:
        quantize_model(model, config, hessians)
    except BudgetError as error:
        if budget is None:
            raise
        raise BudgetError(f"bits_per_parameter={bits_per_parameter} leaves {bits_per_weight:.3f} bits per target "
                          f"weight once the tensors stored dense and the config files are paid: {error}") from None
    refinement = None
    if refine_steps > 0:
        teacher = AutoModelForCausalLM.from_pretrained(run_dir, dtype="auto") if refine_loss == "teacher" else None
        refinement = _refine_on_run_data(model, run_dir, refine_steps, refine_learning_rate, data_args, teacher)
    model.to(save_dtype)  # what stays dense; the compressed layers' payloads are bytes, their biases follow
    extra = {"refinement": refinement} if refinement else {}
    if hessians is not None:
        extra["calibration"] = calibration.describe()
    if budget is not None:
        extra["budget"] = budget
    with staged_folder(out_dir) as staging:  # moved into place once complete: never a half export, nor a lost one
        model.save_pretrained(staging)
        try:
            AutoTokenizer.from_pretrained(run_dir).save_pretrained(staging)
        except (OSError, ValueError):
            logger.warning(f"{run_dir} has no tokenizer; exporting the model alone.")
        if Path(run_dir, STATS_NAME).exists():  # the card and `evaluate` read the training run's figures from here
            shutil.copy(Path(run_dir, STATS_NAME), Path(staging, TRAINING_STATS_NAME))
        report = write_bits_report(staging, extra or None)
        from ..cards import write_model_card  # lazy: huggingface_hub's card code stays out of the quantization import

        write_model_card(staging, model_id=str(out_dir))  # README.md: the card `hf-signlock push` would upload
    return report


def check_destination(run_dir, out_dir, overwrite: bool) -> None:
    """Refuse, unless ``overwrite``, an export into the run folder itself or into a folder that holds anything: an
    export replaces the whole folder (so no result of an earlier export, such as its eval.json, outlives it)."""
    out, run = Path(out_dir), Path(run_dir)
    if out.exists() and not out.is_dir():
        raise SignLockConfigError(f"OUT_DIR {out_dir} is a file; pass a folder (it is created).")
    if overwrite:
        return
    if out.exists() and run.exists() and out.resolve() == run.resolve():
        raise SignLockConfigError(f"OUT_DIR {out_dir} is the run folder itself: the export would replace the trained "
                                  "model. Pass another folder, or --overwrite to replace the run with its export.")
    if out.is_dir() and any(out.iterdir()):
        raise SignLockConfigError(f"OUT_DIR {out_dir} is not empty; an export replaces the whole folder. Pass a new "
                                  "folder, or --overwrite to replace it.")


@contextlib.contextmanager
def staged_folder(out_dir):
    """A temporary folder beside ``out_dir`` to write into; on success it replaces ``out_dir`` (a rename each,
    the old folder removed only after the new one is in place), on failure or interruption it is removed and
    ``out_dir`` is left as it was."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _refine_on_run_data(model, run_dir, steps: int, learning_rate: float, data_args=None, teacher=None) -> dict:
    """Refine on the training split of the data the run was trained on."""
    from transformers import AutoTokenizer

    from ..data import build_lm_datasets, data_arguments_of, load_raw_datasets
    from .refine import refine

    data_args = data_args or data_arguments_of(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    train = build_lm_datasets(load_raw_datasets(data_args), tokenizer, data_args)["train"]
    return refine(model, train, steps, learning_rate, teacher=teacher)
