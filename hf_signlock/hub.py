"""Hub uploads of SignLock models: the checkpoint, ``bpw.json`` and the SignLock model card in one commit.

``push_to_hub(model, repo_id, ...)`` takes the arguments of transformers' ``model.push_to_hub`` and honours each
(revision, create_pr, max_shard_size, commit_message, commit_description, tags, private, token);
``push_folder(folder, repo_id)`` uploads an export folder (``hf-signlock push``). ``model.push_to_hub`` itself works
too and uploads a loadable checkpoint, with transformers' generic card (tagged ``hf-signlock``) instead of ours and no
``bpw.json``. ``HF_ENDPOINT`` chooses the Hub, as everywhere in huggingface_hub.

A Hub that cannot be reached (offline mode, ``HF_HUB_OFFLINE=1``; no network; a refused connection; a timeout) is
``HubUnreachableError``, whose message names the Hub's address and what to do, not the HTTP client's traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from huggingface_hub import HfApi

from .cards import hub_base_model, model_card, write_model_card
from .constants import QUANT_METHOD
from .errors import HubUnreachableError, SignLockError
from .quantization.bits import write_bits_report

# (module, class) of the HTTP clients' "no connection" errors; looked up only in modules already imported
_CONNECTION_ERRORS = (("requests", "ConnectionError"), ("requests", "Timeout"), ("httpx", "TransportError"),
                      ("httpx2", "TransportError"))


def _unreachable_kinds() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import OfflineModeIsEnabled

    kinds = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, name in _CONNECTION_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    return tuple(kinds)


def hub_unreachable(error: BaseException, endpoint: str) -> HubUnreachableError | None:
    """``error`` (or an error it was raised from) as a ``HubUnreachableError`` when it says the Hub at ``endpoint``
    cannot be reached (offline mode, a refused or failed connection, a timeout); None for any other error (an
    HTTP status from a Hub that answered, a bad argument)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    kinds, seen = _unreachable_kinds(), set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OfflineModeIsEnabled):
            return HubUnreachableError(
                f"cannot push to the Hub ({endpoint}): huggingface_hub is in offline mode (HF_HUB_OFFLINE="
                f"{os.environ.get('HF_HUB_OFFLINE', '1')}). Unset HF_HUB_OFFLINE (or set it to 0) on a machine that "
                "reaches the Hub and push again; nothing was uploaded.")
        if isinstance(error, kinds) and not isinstance(error, HfHubHTTPError):
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            return HubUnreachableError(
                f"cannot reach the Hugging Face Hub at {endpoint} ({type(error).__name__}: {reason}). Check the "
                "network connection, proxy settings and HF_ENDPOINT, then push again; nothing was committed.")
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def reaching_hub(endpoint: str):
    """Run Hub calls, turning "the Hub cannot be reached" errors into ``HubUnreachableError`` (others pass)."""
    try:
        yield
    except Exception as error:
        mapped = hub_unreachable(error, endpoint)
        if mapped is None:
            raise
        raise mapped from error


def push_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: bool | str | None = None,
                revision: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                base_model: str | None = None) -> str:
    """Write the model card into ``folder`` (its ``README.md``, ``cards.write_model_card`` with the repo's id,
    ``base_model`` and ``tags``) and upload the folder to ``repo_id`` in one commit, on branch ``revision`` (created
    from main if missing) or in a new pull request with ``create_pr``. Returns the commit's URL, or the pull
    request's. A Hub that cannot be reached raises ``HubUnreachableError``, before the card is written when it
    cannot be reached at all."""
    model_card(folder, repo_id, base_model)  # refuses a folder that is no export before the Hub is contacted
    api = HfApi(token=token)
    with reaching_hub(api.endpoint):
        full_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    # a bare name lands in the token's namespace: the card's snippets name the full id
    write_model_card(folder, full_id, base_model, tags)
    with reaching_hub(api.endpoint):
        if revision is not None and not revision.startswith("refs/pr/"):  # the Hub refuses commits to a missing branch
            api.create_branch(full_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=full_id, folder_path=str(folder), commit_message=commit_message or
                                 "Upload SignLock model", commit_description=commit_description, revision=revision,
                                 create_pr=create_pr)
    return str(info.pr_url if create_pr and info.pr_url else info)


def push_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                tokenizer=None, base_model: str | None = None) -> str:
    """Save a SignLock ``model`` (and ``tokenizer``) with ``bpw.json`` and its card, and upload them to ``repo_id``
    (see ``push_folder``). The card's tags are the model's own (``model.model_tags``) and ``tags``.

    ``base_model`` (for the card) defaults to the Hub id the model was loaded from, when it was loaded from one
    (a dense model quantized on load), and that id is not ``repo_id`` itself."""
    quantization = getattr(model.config, "quantization_config", None) or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    if method != QUANT_METHOD:
        raise SignLockError(f"{type(model).__name__} is not a SignLock model (its config has no signlock "
                            "quantization_config): compress it first with hf_signlock.quantize_model(model, "
                            "SignLockConfig(...)), or load it with from_pretrained(..., quantization_config="
                            "SignLockConfig(...)). A dense model uploads with model.push_to_hub(repo_id).")
    if base_model is None:
        base_model = hub_base_model(getattr(model.config, "_name_or_path", None))
        base_model = None if base_model == repo_id else base_model
    tags = [*(getattr(model, "model_tags", None) or ()), *(tags or ())]
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_bits_report(folder)
        return push_folder(folder, repo_id, commit_message=commit_message, commit_description=commit_description,
                           private=private, token=token, revision=revision, create_pr=create_pr, tags=tags,
                           base_model=base_model)
