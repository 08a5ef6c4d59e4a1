"""Hub uploads of SignLock models: the checkpoint, ``bpw.json`` and the SignLock model card in one commit.

``push_to_hub(model, repo_id, ...)`` takes the arguments of transformers' ``model.push_to_hub`` and honours each
(revision, create_pr, max_shard_size, commit_description, tags, private, token); ``push_folder(folder, repo_id)``
uploads an export folder (``hf-signlock push``). ``model.push_to_hub`` itself works too and uploads a loadable
checkpoint, with transformers' generic card (tagged ``hf-signlock``) instead of ours. ``HF_ENDPOINT`` chooses the
Hub, as everywhere in huggingface_hub.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .cards import export_card, hub_base_model
from .constants import CARD_NAME
from .quantization.bits import write_bits_report


def push_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: bool | str | None = None,
                revision: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                base_model: str | None = None) -> str:
    """Write the model card into ``folder`` and upload the folder to ``repo_id`` in one commit; returns the commit
    URL (or the pull request's, with ``create_pr``)."""
    card = export_card(folder, repo_id, base_model)
    for tag in tags or ():
        if tag not in card.data.tags:
            card.data.tags.append(tag)
    card.save(Path(folder) / CARD_NAME)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or
                             "Upload SignLock model", commit_description=commit_description, revision=revision,
                             create_pr=create_pr)
    return str(info.pr_url if create_pr and info.pr_url else info)


def push_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                tokenizer=None, base_model: str | None = None) -> str:
    """Save a SignLock ``model`` (and ``tokenizer``) with ``bpw.json`` and its card, and upload them to ``repo_id``.

    ``base_model`` (for the card) defaults to the Hub id the model was loaded from, when it was loaded from one."""
    base_model = base_model or hub_base_model(getattr(model.config, "_name_or_path", None))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_bits_report(folder)
        return push_folder(folder, repo_id, commit_message=commit_message, commit_description=commit_description,
                           private=private, token=token, revision=revision, create_pr=create_pr, tags=tags,
                           base_model=base_model)
