"""Model cards: a training run's (``model_cards/trained_model.md``) and a SignLock export's
(``model_cards/signlock_export.md``), rendered with ``ModelCard.from_template`` from the files beside the model.

The export card's metadata names what the Hub indexes: ``base_model`` with ``base_model_relation: quantized``,
``pipeline_tag: text-generation``, the data the numbers were measured on, and a model-index of bits per weight,
perplexity and flip rate. Reading files only, it imports nothing of training or quantization.

``write_model_card(folder)`` writes an export's card as its ``README.md`` (atomically), so that the card can be read
before anything is pushed; ``hf-signlock push`` writes it again with the repo id, base model and tags it pushes with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .constants import BPW_NAME, CARD_NAME, EVAL_NAME, QUANT_METHOD, STATS_NAME, TRAINING_STATS_NAME
from .errors import SignLockError
from .paths import replaced_whole

TEMPLATES = Path(__file__).resolve().parent / "model_cards"  # package data (a link to the top-level model_cards/)
TAGS = ["hf-signlock", "sign-lock-in"]
UNKNOWN_DATA = "held-out split of the training text"  # a run that did not record its data


def _read(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _versions(stats: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (stats.get("versions") or {}).items() if v)


def _results(metrics) -> list[EvalResult]:
    """model-index entries from ``(kind, label, value, dataset)``: each names the data it was measured on."""
    return [EvalResult(task_type="text-generation", dataset_type="text", dataset_name=dataset, metric_type=kind,
                       metric_name=label, metric_value=value) for kind, label, value, dataset in metrics
            if value is not None]


def hub_base_model(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it names a Hub repo (``owner/name``, not a local folder), else None."""
    if not name_or_path or os.path.exists(name_or_path) or name_or_path.count("/") != 1:
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:  # a relative path such as ./run or runs/.tmp is no repo id
        return None
    return name_or_path


def training_card(output_dir: str | os.PathLike, architecture: str) -> ModelCard:
    """The card of a training run, from its ``signlock_stats.json``."""
    output_dir = Path(output_dir)
    stats = json.loads((output_dir / STATS_NAME).read_text())
    name = output_dir.name
    dataset = stats.get("dataset") or "held-out split"
    results = _results([("perplexity", "Perplexity", stats["eval_perplexity"], dataset),
                        ("flip_rate", "Flip rate", stats["flip_rate"], dataset)])
    base_model = hub_base_model(stats.get("model_name_or_path"))
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=TAGS,
                              model_name=name, eval_results=results or None, base_model=base_model,
                              base_model_relation="finetune" if base_model else None)
    values = {**stats, "versions": _versions(stats)}
    return ModelCard.from_template(card_data, template_path=str(TEMPLATES / "trained_model.md"), model_name=name,
                                   model_id=name, architecture=architecture, **values)


def export_card(folder: str | os.PathLike, model_id: str, base_model: str | None = None) -> ModelCard:
    """The card of a SignLock export in ``folder`` (its ``config.json`` and ``bpw.json``; ``eval.json`` and
    ``training_signlock_stats.json`` when present). Each model-index result names the data it was measured on:
    perplexity the text of ``eval.json`` (or of the run's evaluation), the flip rate the run's data."""
    folder = Path(folder)
    config = _read(folder, "config.json")
    if config is None or (config.get("quantization_config") or {}).get("quant_method") != QUANT_METHOD:
        raise SignLockError(f"{folder} is not a SignLock export (no config.json with a signlock quantization_config): "
                            "export a trained model with `hf-signlock export RUN_DIR OUT_DIR`, or save a quantized "
                            "one with hf_signlock.push_to_hub(model, repo_id).")
    report = _read(folder, BPW_NAME)
    if report is None:
        raise SignLockError(f"{folder} has no {BPW_NAME}: export it with `hf-signlock export RUN_DIR {folder}`, or "
                            f"count its bits with hf_signlock.write_bits_report({str(folder)!r}).")
    training = _read(folder, TRAINING_STATS_NAME)
    evaluation = _read(folder, EVAL_NAME)  # the export's own perplexity, when it was evaluated
    sealed = config["quantization_config"].get("config_checksum")
    if evaluation is not None and sealed and evaluation.get("checkpoint_checksum") != sealed:
        evaluation = None  # measured on another checkpoint (an earlier export, a copied file): not this one's figure
    run_data = (training or {}).get("dataset") or UNKNOWN_DATA
    if evaluation is not None:
        perplexity, source, dataset = evaluation["perplexity"], "this compressed model", evaluation.get("dataset")
    elif training is not None and training.get("eval_perplexity") is not None:
        perplexity, source, dataset = training["eval_perplexity"], "the dense model before export", run_data
    else:
        perplexity, source, dataset = None, None, None
    dataset = dataset or run_data
    flip_rate = training.get("flip_rate") if training else None
    # bits per weight are counted from the files, on no data: listed with the headline perplexity's dataset
    checkpoint = report["checkpoint"]
    results = _results([("bits_per_parameter", "Bits per parameter (whole file)", checkpoint["bits_per_parameter"],
                         dataset),
                        ("bits_per_weight", "Bits per weight", report["bpw"], dataset),
                        ("perplexity", "Perplexity", perplexity, dataset),
                        ("flip_rate", "Flip rate", flip_rate, run_data)])
    base_model = base_model or hub_base_model((training or {}).get("model_name_or_path"))
    name = model_id.split("/")[-1]
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=[*TAGS, "sub-bit"],
                              model_name=name, eval_results=results, base_model=base_model,
                              base_model_relation="quantized" if base_model else None)
    if training:
        training = {**training, "versions": _versions(training)}
    quantization = config["quantization_config"]
    kinds = {layer.get("kind") for layer in report["layers"].values()}
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "signlock_export.md"), model_name=name, model_id=model_id,
        architecture=(config.get("architectures") or [config.get("model_type", "")])[0], base_model=base_model,
        seed=quantization.get("seed"), sign_source=report["sign_source"], sign_base=quantization.get("base_model"),
        codec=report["codec"],
        codec_params=json.dumps(report.get("codec_params") or {}), bpw=report["bpw"], checkpoint=checkpoint,
        flip_rate=flip_rate, perplexity=perplexity, perplexity_source=source, dataset=dataset, training=training,
        refinement=report.get("refinement"), has_tokenizer=(folder / "tokenizer_config.json").exists(),
        target_embeddings=bool(quantization.get("target_embeddings")), has_head="head" in kinds,
        **report["total"],
    )


def model_card(folder: str | os.PathLike, model_id: str | None = None, base_model: str | None = None,
               tags: Iterable[str] | None = None) -> ModelCard:
    """The card ``hf-signlock push`` uploads with the export in ``folder``: ``export_card`` with ``tags`` added to its
    own. ``model_id`` (the repo id its snippets load) defaults to ``folder`` itself, which loads locally."""
    card = export_card(folder, model_id or str(folder), base_model)
    for tag in tags or ():
        if tag not in card.data.tags:
            card.data.tags.append(tag)
    return card


def write_model_card(folder: str | os.PathLike, model_id: str | None = None, base_model: str | None = None,
                     tags: Iterable[str] | None = None) -> Path:
    """Write the model card of the export in ``folder`` (``model_card``, from the folder's own files) to
    ``folder/README.md``, atomically (a temporary file renamed over it); returns its path. Call it again after
    adding ``eval.json``: the card shows the perplexity it holds."""
    card = model_card(folder, model_id, base_model, tags)
    path = Path(folder) / CARD_NAME
    with replaced_whole(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:  # newline="": as ModelCard.save
            stream.write(str(card))
        # mkstemp makes the file private: give the card the permissions of the export's config.json instead
        os.chmod(temporary, (path.parent / "config.json").stat().st_mode & 0o777)
    return path
