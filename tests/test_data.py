"""Data: local files through `datasets`, the validation tail, the tokenizer, LM blocks, the built-in corpus."""

import subprocess

import pytest
from transformers import AutoTokenizer

from hf_signlock import DataError
from hf_signlock.data import DataArguments, build_lm_datasets, default_corpus_files, load_raw_datasets, train_tokenizer

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7 % 13}.\n" for i in range(400))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_local_text_files_and_validation_tail(text_file):
    raw = load_raw_datasets(DataArguments(dataset_name=None, data_files=[str(text_file)], validation_fraction=0.1))
    assert len(raw["train"]) == 360 and len(raw["validation"]) == 40
    assert raw["validation"][0]["text"].startswith("Line 360:")  # the contiguous tail, unshuffled
    assert raw["train"][-1]["text"].endswith("\n")  # line breaks kept: the text round-trips


def test_missing_data_file_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"`data_files`.*missing\.txt"):
        load_raw_datasets(DataArguments(data_files=[str(tmp_path / "missing.txt")]))


def test_missing_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"`text_column`.*\['body'\]"):
        load_raw_datasets(DataArguments(data_files=[str(path)]))


@pytest.mark.parametrize(("field", "value"), [("block_size", 1), ("validation_fraction", 1.0), ("tokenizer_vocab_size", 10)])
def test_bad_data_arguments(field, value):
    with pytest.raises(DataError, match=field):
        DataArguments(**{field: value})


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    lines = TEXT.splitlines(keepends=True)
    first, second = train_tokenizer(lines, 300), train_tokenizer(lines, 300)
    assert first.get_vocab() == second.get_vocab()
    first.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = first(TEXT[:500])["input_ids"]
    assert reloaded(TEXT[:500])["input_ids"] == ids
    assert first.decode(ids) == TEXT[:500]
    assert first.eos_token == first.pad_token == "<|endoftext|>"


def test_blocks_cover_the_tokens(text_file):
    args = DataArguments(dataset_name=None, data_files=[str(text_file)], block_size=32, validation_fraction=0.1)
    raw = load_raw_datasets(args)
    tokenizer = train_tokenizer(raw["train"]["text"], 300)
    blocks = build_lm_datasets(raw, tokenizer, args)
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in raw["train"]["text"])
    assert len(blocks["train"]) == total // 32
    assert all(len(row["input_ids"]) == 32 and row["labels"] == row["input_ids"] for row in blocks["train"])
    limited = build_lm_datasets(raw, tokenizer, DataArguments(**{**vars(args), "max_train_blocks": 5}))
    assert len(limited["train"]) == 5 and limited["train"][4] == blocks["train"][4]


@pytest.mark.slow
def test_builtin_corpus_is_fetched_once(tmp_path, monkeypatch):
    files = default_corpus_files(str(tmp_path))
    assert len(files) == 42 and files[0].name == "alls_well_that_ends_well_gut.txt"
    assert sum(f.stat().st_size for f in files) > 4_000_000

    def no_network(*args, **kwargs):
        raise AssertionError("the cached corpus must not be fetched again")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert default_corpus_files(str(tmp_path)) == files
