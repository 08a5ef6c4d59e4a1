"""Text from any source as one stream of token ids: the DATASET of ``hf-signlock eval``, and the calibration text of
an export (``quantization/calibration.py``).

DATASET may be

- nothing: the held-out split of the run's own data (the settings in its ``signlock_stats.json``, or an export's
  copy; the defaults otherwise), tokenised and cut exactly as training did (the held-out blocks, at most
  ``max_eval_blocks`` of them, end to end), so that the number matches what the run saw;
- a local text file (``.txt``, ``.md``, anything that is not a table format): its whole text, verbatim;
- a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file: the rows of its ``text_column``;
- a folder: every such file in it (recursively, sorted, one format), or a dataset written by
  ``Dataset.save_to_disk``;
- ``shakespeare``: the built-in corpus, held out as training holds it out;
- any other ``datasets`` name (with ``dataset_config_name``): ``datasets.load_dataset``.

How documents are joined: rows of the ``text`` builder (and of the built-in corpus) are lines that keep their line
breaks, so they are joined with nothing and give back the file. Other rows are documents, joined with ``"\\n\\n"``,
as the Transformers perplexity guide joins WikiText. The joined text is tokenised once, with the tokenizer's
special tokens (a tokenizer that prepends BOS gives the first word a context, as in the guide).

The split: ``split`` if given (it must exist); else ``test``, then ``validation``, then ``train``, the first the
source has. Local files have one split, ``train``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .paths import inside

DOCUMENT_SEPARATOR = "\n\n"
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_PREFERENCE = ("test", "validation", "train")
_DISK_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes


@dataclass
class EvalText:
    """One stream of token ids to score, and what it is in words (for reports)."""

    input_ids: torch.Tensor
    description: str


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in {".txt", ".md", *TABLE_BUILDERS}


def _pick_split(splits, split: str | None, what: str) -> str:
    names = list(splits)
    if split is not None:
        if split not in names:
            raise DataError(f"--split {split!r} does not exist in {what}; it has {names}. Pass one of them.")
        return split
    for name in SPLIT_PREFERENCE:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise DataError(f"{what} has the splits {names}, none of {list(SPLIT_PREFERENCE)}: pass --split.")


def _column(data, text_column: str, what: str) -> list[str]:
    if text_column not in data.column_names:
        raise DataError(f"--text_column {text_column!r} is not a column of {what}; it has {data.column_names}. "
                        "Pass --text_column with one of them.")
    return [row for row in data[text_column] if row]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"--dataset file {str(path)!r} is not UTF-8 text ({error}); pass a text, json, csv or "
                        "parquet file.") from error


def _local_documents(path: Path, split: str | None, text_column: str) -> tuple[str, str]:
    """Text of a local file or folder, and its description."""
    import datasets

    if path.is_dir() and any((path / marker).exists() for marker in _DISK_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            chosen = _pick_split(loaded, split, f"--dataset {str(path)!r}")
            loaded, where = loaded[chosen], f"{path.name} ({chosen} split)"
        else:
            where = path.name
        rows = _column(loaded, text_column, f"--dataset {str(path)!r}")
        return DOCUMENT_SEPARATOR.join(rows), f"{where}, {len(rows):,} documents joined with a blank line"
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise DataError(f"--dataset folder {str(path)!r} holds no files; pass a text file, or a folder of them.")
    if split not in (None, "train"):
        raise DataError(f"--split {split!r}: a local --dataset has a single split, 'train'; leave --split out.")
    kinds = {TABLE_BUILDERS.get(f.suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise DataError(f"--dataset folder {str(path)!r} mixes text files and {sorted(kinds - {'text'})} tables; "
                        "pass one kind of file.")
    builder = kinds.pop()
    name = path.name if path.is_file() else f"{path.name}/ ({len(files)} files)"
    if builder == "text":
        if len(files) == 1:
            return _read_text(files[0]), f"{name}, the whole text"
        return (DOCUMENT_SEPARATOR.join(_read_text(f) for f in files),
                f"{name}, one document per file, joined with a blank line")
    try:
        data = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as error:  # a malformed table: datasets raises many kinds
        raise DataError(f"--dataset {str(path)!r} cannot be read as {builder}: {error}") from error
    rows = _column(data, text_column, f"--dataset {str(path)!r}")
    return DOCUMENT_SEPARATOR.join(rows), f"{name}, {len(rows):,} rows of {text_column!r} joined with a blank line"


def _hub_documents(name: str, config: str | None, split: str | None, text_column: str) -> tuple[str, str]:
    """Text of a ``datasets`` name (or the built-in corpus), and its description."""
    import datasets

    from .data import DEFAULT_DATASET, DataArguments, load_raw_datasets

    label = name + (f"/{config}" if config else "")
    if name == DEFAULT_DATASET:  # built in: train/validation as training splits it (lines, kept with their breaks)
        raw = load_raw_datasets(DataArguments(text_column=text_column))
        chosen = _pick_split(raw, split, "the built-in corpus")
        return "".join(raw[chosen][text_column]), f"Shakespeare (built in), {chosen} split"
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as error:  # not found, offline, bad config: datasets raises many kinds
        raise DataError(
            f"--dataset {label!r} cannot be loaded with datasets.load_dataset ({type(error).__name__}: {error}). "
            "Pass a local text/json/csv/parquet file or folder, or a dataset name (and --dataset_config_name) that "
            "`datasets` can reach."
        ) from error
    chosen = _pick_split(loaded, split, f"--dataset {label!r}")
    data = loaded[chosen]
    rows = _column(data, text_column, f"--dataset {label!r}")
    if getattr(data, "builder_name", None) == "text":  # the `text` builder's rows are lines
        return "".join(rows), f"{label}, {chosen} split"
    return DOCUMENT_SEPARATOR.join(rows), f"{label}, {chosen} split, {len(rows):,} documents joined with a blank line"


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """``text`` as a 1-D tensor of token ids (special tokens included); the first ``max_tokens`` if given.

    With ``max_tokens`` only a prefix of the text is tokenised, eight characters a token to start with, doubled
    until it gives more tokens than needed (the last token of a cut prefix may differ from the whole text's; it is
    dropped).
    """
    def encode(part: str) -> list[int]:
        return tokenizer(part, add_special_tokens=True, verbose=False)["input_ids"]

    if max_tokens is None:
        return torch.tensor(encode(text), dtype=torch.long)
    chars = 8 * max_tokens
    while True:
        ids = encode(text[:chars])
        if chars >= len(text) or len(ids) > max_tokens:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        chars *= 2


def _run_data_tokens(tokenizer, data_args, split: str | None) -> tuple[torch.Tensor, str]:
    """The held-out (or ``split``) blocks of the run's data, end to end, and their description."""
    import datasets

    from .data import build_lm_datasets, describe_data, load_raw_datasets

    chosen = split or "validation"
    if chosen not in ("validation", "train"):
        raise DataError(f"--split {chosen!r}: the run's own data has the splits 'train' and 'validation'; pass one "
                        "of them, or --dataset for other text.")
    raw = load_raw_datasets(data_args)
    blocks = build_lm_datasets(datasets.DatasetDict({chosen: raw[chosen]}), tokenizer, data_args)[chosen]
    ids = torch.tensor(blocks["input_ids"], dtype=torch.long).reshape(-1)
    description = describe_data(data_args)
    if chosen == "train":
        description = f"the training split of the run's data ({description})"
    return ids, description + ", end to end"


def check_recorded_data(data_args, folder: Path) -> None:
    """Refuse local data that a model folder's recorded training settings name outside that folder: a checkpoint's
    files are input, and evaluation reads the files a user names (``--dataset``, ``--config``), not those a file
    names. Dataset names (the built-in corpus, Hub datasets) and files inside the folder are fine."""
    named = list(data_args.data_files or ())
    if data_args.dataset_name and (_looks_like_path(data_args.dataset_name) or Path(data_args.dataset_name).exists()):
        named.append(data_args.dataset_name)
    for name in named:
        if not inside(folder, str(name)):
            raise DataError(
                f"{folder} records training data {str(name)!r}, a local path outside the model's folder; evaluation "
                "does not read files a checkpoint names unless asked. Pass the text yourself (--dataset PATH or --config "
                "RECIPE), or --recorded_data to read what the run recorded."
            )


def resolve_eval_text(tokenizer, dataset: str | os.PathLike | None = None, *, model_source: str | None = None,
                      dataset_config_name: str | None = None, split: str | None = None,
                      text_column: str | None = None, data_args=None, max_tokens: int | None = None,
                      recorded_data: bool = False) -> EvalText:
    """Token ids of the DATASET argument (see the module's docstring), tokenised with ``tokenizer``.

    ``model_source``: the MODEL argument, whose recorded data is the default; ``data_args`` overrides it.
    ``max_tokens`` keeps the first tokens. Local files the model's recorded settings name outside its folder are
    read only with ``recorded_data=True`` (``--recorded_data``: the caller vouches for the checkpoint). Raises
    :class:`DataError` naming ``--dataset``, ``--split`` or ``--text_column`` when the text cannot be found or read.
    """
    from .data import DataArguments, data_arguments_of

    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"--max_tokens {max_tokens} is too small: perplexity needs at least 2 tokens.")
    column = text_column or "text"
    if dataset is None:
        if data_args is None:
            folder = Path(model_source) if model_source else None
            data_args = data_arguments_of(folder) if folder is not None and folder.is_dir() else DataArguments()
            if folder is not None and folder.is_dir() and not recorded_data:
                check_recorded_data(data_args, folder)
        if text_column is not None:
            data_args = dataclasses.replace(data_args, text_column=text_column)
        ids, description = _run_data_tokens(tokenizer, data_args, split)
        if max_tokens is not None:
            ids = ids[:max_tokens]
    else:
        name = os.fspath(dataset)
        path = Path(name).expanduser()
        if path.exists():
            text, description = _local_documents(path, split, column)
        elif _looks_like_path(name):
            raise DataError(f"--dataset {name!r} does not exist; pass an existing file or folder, or a dataset name.")
        else:
            text, description = _hub_documents(name, dataset_config_name, split, column)
        if not text.strip():
            raise DataError(f"--dataset {name!r} holds no text (column {column!r} is empty).")
        ids = tokenize_text(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise DataError(f"--dataset gives {ids.numel()} token(s): perplexity needs at least 2; pass more text.")
    count = "first " if max_tokens is not None and ids.numel() == max_tokens else ""
    return EvalText(ids, f"{description}; {count}{ids.numel():,} tokens")
