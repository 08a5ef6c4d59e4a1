"""Model cards and Hub uploads of SignLock exports.

``push(folder, repo_id)`` renders ``model_cards/signlock_export.md`` (Jinja, ``ModelCard.from_template``) into the
folder's ``README.md`` with a model-index of perplexity, flip rate and bits per weight, then uploads the folder
(model, tokenizer, ``bpw.json``, card) in one commit. ``HF_ENDPOINT`` chooses the Hub, as everywhere in
huggingface_hub.
"""

from __future__ import annotations

import json
import os
import tempfile
import types
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .bpw import BPW_NAME, checkpoint_bytes, write_bpw
from .errors import SignLockError
from .evaluate import EVAL_NAME

TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "signlock_export.md"
TRAINING_STATS = "training_signlock_stats.json"


def _read(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def render_card(folder: str | os.PathLike, model_id: str) -> ModelCard:
    folder = Path(folder)
    report = _read(folder, BPW_NAME)
    if report is None:
        raise SignLockError(f"{folder} has no {BPW_NAME}: export it first (`hf-signlock export RUN_DIR {folder}`).")
    config = json.loads((folder / "config.json").read_text())
    training = _read(folder, TRAINING_STATS)
    evaluation = _read(folder, EVAL_NAME)  # the export's own perplexity, when it was evaluated
    if evaluation is not None:
        perplexity, source = evaluation["perplexity"], "this compressed model"
    elif training is not None and training.get("eval_perplexity") is not None:
        perplexity, source = training["eval_perplexity"], "the dense model before export"
    else:
        perplexity, source = None, None
    flip_rate = training.get("flip_rate") if training else None
    metrics = [("bits_per_weight", "Bits per weight", report["bpw"]), ("perplexity", "Perplexity", perplexity),
               ("flip_rate", "Flip rate", flip_rate)]
    results = [EvalResult(task_type="text-generation", dataset_type="text", dataset_name="held-out split",
                          metric_type=kind, metric_name=label, metric_value=value)
               for kind, label, value in metrics if value is not None]
    name = model_id.split("/")[-1]
    card_data = ModelCardData(library_name="transformers", tags=["hf-signlock", "sign-lock-in", "sub-bit"],
                              model_name=name, eval_results=results)
    if training and training.get("versions"):
        training = {**training, "versions": ", ".join(f"{k} {v}" for k, v in training["versions"].items() if v)}
    quantization = config["quantization_config"]
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=name, model_id=model_id,
        architecture=(config.get("architectures") or [config.get("model_type", "")])[0],
        seed=quantization.get("seed"), sign_source=report["sign_source"], codec=report["codec"],
        codec_params=json.dumps(report.get("codec_params") or {}), bpw=report["bpw"], disk_bytes=checkpoint_bytes(folder),
        flip_rate=flip_rate, perplexity=perplexity, perplexity_source=source, training=training,
        refinement=report.get("refinement"), **report["total"],
    )


def push(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
         commit_message: str = "Upload SignLock model") -> str:
    """Write the model card into ``folder`` and upload the folder to ``repo_id``; returns the commit URL."""
    card = render_card(folder, repo_id)
    card.save(Path(folder) / "README.md")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(info)


def _push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                 commit_message: str = "Upload SignLock model", tokenizer=None, **_):
    """``model.push_to_hub`` of a model compressed by ``quantize_model``: weights, bpw.json and our card."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        write_bpw(model, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return push(folder, repo_id, private=private, token=token, commit_message=commit_message)


def attach_push_to_hub(model) -> None:
    model.push_to_hub = types.MethodType(_push_to_hub, model)
