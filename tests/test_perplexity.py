"""Sliding-window perplexity: golden values, each token scored once, stride monotonicity, the DATASET argument,
`hf-signlock eval` end to end, the `evaluate` module, bad input, and (slow) two processes equal to one."""

import itertools
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from perplexity_worker import CONTEXT, corpus_text, tiny_model_folder, tiny_tokenizer

from hf_signlock.cli import main
from hf_signlock.errors import DataError, ModelLoadError, SignLockConfigError
from hf_signlock.evaluation.perplexity import (
    evaluate_folder,
    evaluate_model,
    sliding_window_perplexity,
    sliding_windows,
)
from hf_signlock.text import resolve_eval_text

REPO = Path(__file__).resolve().parents[1]
METRIC = REPO / "hf_signlock" / "evaluation" / "metrics" / "perplexity"


class TableModel(torch.nn.Module):
    """Fixed logits: row ``table[x]`` after token ``x`` (a bigram model), or a unigram cache over the window."""

    def __init__(self, table=None, vocab=None, context=None, cache=False, keep=True):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32) if table is not None
                                        else torch.zeros(vocab, vocab))
        self.config = types.SimpleNamespace(max_position_embeddings=context)
        self.cache, self.calls = cache, []
        if not keep:  # a model without `logits_to_keep`: the full logits path
            self.forward = self.forward_all

    def forward(self, input_ids, logits_to_keep=0):
        logits = self.forward_all(input_ids).logits
        return types.SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def forward_all(self, input_ids):
        self.calls.append(tuple(input_ids.shape))
        if self.cache:  # p(v) ~ occurrences of v so far in the window + 0.1: more context, better guesses
            counts = torch.nn.functional.one_hot(input_ids, self.table.shape[0]).float().cumsum(1)
            return types.SimpleNamespace(logits=torch.log(counts + 0.1))
        return types.SimpleNamespace(logits=self.table[input_ids])


# --- the computation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,window,stride", [(1, 4, 2), (2, 4, 3), (10, 4, 1), (10, 4, 3), (37, 8, 5), (37, 8, 7),
                                                  (37, 64, 32), (64, 8, 4), (65, 8, 4)])
def test_every_token_after_the_first_is_scored_once_with_its_context(length, window, stride):
    scored = []
    for w in sliding_windows(length, window, stride):
        assert w.end - w.begin <= window
        positions = range(max(w.begin + 1, w.end - w.targets), w.end)  # the first token of a window is context
        scored += positions
        for t in positions:  # at least window - stride tokens of context, or all before it
            assert t - w.begin >= min(t, window - stride)
    assert scored == list(range(1, length))


def test_hand_computed_perplexity_of_a_bigram_model():
    # p(.|0) = (1/4, 3/4), p(.|1) = (1/2, 1/2); the text 0 1 1 0 0 costs -ln(3/4 * 1/2 * 1/2 * 1/4) in 4 tokens
    model = TableModel([[0.0, math.log(3.0)], [0.0, 0.0]])
    golden = (64 / 3) ** 0.25
    for window, stride, batch in [(5, 4, 1), (2, 1, 1), (3, 1, 2), (3, 2, 8), (4, 3, 2), (16, 8, 8)]:
        result = sliding_window_perplexity(model, [0, 1, 1, 0, 0], window, stride, batch)
        assert result["tokens"] == 4
        assert result["perplexity"] == pytest.approx(golden, rel=1e-6), (window, stride)
        assert result["nll"] == pytest.approx(math.log(64 / 3), rel=1e-6)


def test_random_bigram_model_matches_a_direct_sum_for_any_stride_batch_and_logits_path():
    torch.manual_seed(0)
    table = torch.randn(11, 11) * 2
    ids = torch.randint(0, 11, (203,))
    direct = -torch.log_softmax(table[ids[:-1]], -1).gather(1, ids[1:, None]).sum().item()
    for keep in (True, False):
        model = TableModel(table, keep=keep)
        for window, stride, batch in [(16, 15, 4), (16, 8, 3), (32, 1, 64), (7, 3, 1), (300, 150, 2)]:
            result = sliding_window_perplexity(model, ids, window, stride, batch)
            assert result["tokens"] == 202 and result["nll"] == pytest.approx(direct, rel=1e-6)


def test_logits_to_keep_asks_only_for_the_scored_positions():
    model = TableModel(vocab=5)
    seen = []
    forward = model.forward
    model.forward = lambda input_ids, logits_to_keep=0: seen.append(logits_to_keep) or forward(input_ids, logits_to_keep)
    sliding_window_perplexity(model, torch.arange(40) % 5, 16, 4, batch_size=100)
    assert seen == [16, 5]  # the first window scores all its tokens; the rest (one batch) stride + 1


def test_window_at_least_the_text_equals_the_full_sequence_loss(tmp_path):
    folder = tiny_model_folder(tmp_path / "model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(corpus_text(6))["input_ids"][:CONTEXT]
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    result = sliding_window_perplexity(model, ids, CONTEXT, 32)
    assert result["tokens"] == len(ids) - 1
    assert abs(result["eval_loss"] - direct) <= 1e-4 * direct
    assert abs(result["perplexity"] - math.exp(direct)) <= 1e-4 * math.exp(direct)
    # batching, windows and the logits_to_keep path change nothing beyond float noise
    longer = tokenizer(corpus_text(40))["input_ids"]
    one = sliding_window_perplexity(model, longer, 48, 16, batch_size=1)
    many = sliding_window_perplexity(model, longer, 48, 16, batch_size=7)
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-6)


def test_perplexity_goes_down_as_the_stride_shrinks_on_real_text():
    text = (REPO / "docs" / "method.md").read_text()
    tokenizer = tiny_tokenizer(text, 512)
    ids = tokenizer(text)["input_ids"][:1500]
    model = TableModel(vocab=len(tokenizer), cache=True)
    values = [sliding_window_perplexity(model, ids, 64, stride, 64)["perplexity"] for stride in (63, 32, 16, 8)]
    assert all(later < earlier for earlier, later in itertools.pairwise(values)), values


# --- bad input -----------------------------------------------------------------------------------------------------------


def test_bad_windows_and_texts_are_refused_with_the_flag():
    model = TableModel(vocab=4, context=128)
    with pytest.raises(SignLockConfigError, match=r"--window 2048 is longer than the model's context "
                       r"\(max_position_embeddings=128\); pass --window 128 or less"):
        sliding_window_perplexity(model, [1, 2, 3], 2048, 512)
    with pytest.raises(SignLockConfigError, match=r"--stride 64.*--stride 63"):
        sliding_window_perplexity(model, [1, 2, 3], 64, 64)
    with pytest.raises(SignLockConfigError, match=r"--stride 0"):
        sliding_window_perplexity(model, [1, 2, 3], 64, 0)
    with pytest.raises(SignLockConfigError, match=r"--window 1 "):
        sliding_window_perplexity(model, [1, 2, 3], 1, 1)
    with pytest.raises(DataError, match="at least 2"):
        sliding_window_perplexity(model, [1], 8, 4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny run folder whose recorded data is a local text file, the file, and an export of the model."""
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(300))
    run = tiny_model_folder(root / "run", data_files=[str(corpus)])
    return types.SimpleNamespace(root=root, corpus=corpus, run=run)


@pytest.fixture(scope="module")
def export(folders):
    """A SignLock export (seeded signs, `scale` codec) of a gap-initialised tiny model whose weights then moved
    (a few percent of signs flipped), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_signlock import SignLockConfig, apply_gap_init, quantize_model

    model = AutoModelForCausalLM.from_pretrained(folders.run)
    torch.manual_seed(1)
    with torch.no_grad():
        for target in apply_gap_init(model, seed=3, gap=0.5):
            target.param.add_(torch.randn_like(target.param) * target.init_std)
    quantize_model(model, SignLockConfig(seed=3, codec="scale"))
    out = folders.root / "export"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folders.run).save_pretrained(out)
    return out


def test_bad_model_and_dataset_arguments_are_refused(folders, tmp_path, monkeypatch):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((folders.run / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="MODEL .*no_weights.* has no weights"):
        evaluate_model(str(empty), str(folders.corpus))
    with pytest.raises(SignLockConfigError, match=rf"--window 100 is longer .*max_position_embeddings={CONTEXT}"):
        evaluate_model(str(folders.run), str(folders.corpus), window=100)
    with pytest.raises(DataError, match=r"--dataset '.*missing.txt' does not exist"):
        evaluate_model(str(folders.run), str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"--split 'test'"):
        evaluate_model(str(folders.run), str(folders.corpus), split="test")
    with pytest.raises(DataError, match=r"--split 'test'.*'train' and 'validation'"):
        evaluate_model(str(folders.run), split="test", recorded_data=True)
    with pytest.raises(DataError, match=r"records training data .*corpus\.txt.*outside.*--dataset.*--recorded_data"):
        evaluate_model(str(folders.run))  # a file the run's stats name is read only when asked
    table = tmp_path / "rows.jsonl"
    table.write_text('{"body": "thou art"}\n')
    with pytest.raises(DataError, match=r"--text_column 'text' is not a column .* \['body'\]"):
        evaluate_model(str(folders.run), str(table))
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the Hub is unreachable: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"--dataset 'no_such_dataset_xyz' cannot be loaded"):
        evaluate_model(str(folders.run), "no_such_dataset_xyz")


# --- the DATASET argument --------------------------------------------------------------------------------------------------


def test_dataset_sources_resolve_to_the_documented_text(folders, tmp_path):
    from transformers import AutoTokenizer

    from hf_signlock.data import build_lm_datasets, data_arguments_of, load_raw_datasets

    tokenizer = AutoTokenizer.from_pretrained(folders.run)

    def encode(text):
        return tokenizer(text)["input_ids"]

    text = folders.corpus.read_text()
    assert resolve_eval_text(tokenizer, str(folders.corpus)).input_ids.tolist() == encode(text)  # verbatim
    assert resolve_eval_text(tokenizer, folders.corpus, max_tokens=50).input_ids.tolist() == encode(text)[:50]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("thou art more lovely")
    (docs / "b.txt").write_text("rough winds do shake")
    assert resolve_eval_text(tokenizer, docs).input_ids.tolist() == encode("thou art more lovely\n\nrough winds do shake")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "thou art"}\n{"text": "more lovely"}\n')
    assert resolve_eval_text(tokenizer, rows).input_ids.tolist() == encode("thou art\n\nmore lovely")
    # no DATASET: the run's held-out blocks, end to end, as training cut them
    args = data_arguments_of(folders.run)
    held_out = build_lm_datasets(load_raw_datasets(args), tokenizer, args)["validation"]
    default = resolve_eval_text(tokenizer, model_source=str(folders.run), recorded_data=True)
    assert default.input_ids.tolist() == [t for block in held_out["input_ids"] for t in block]
    assert "held-out split" in default.description and "corpus.txt" in default.description


# --- hf-signlock eval --------------------------------------------------------------------------------------------------------


def test_eval_command_end_to_end(folders, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "out" / "ppl.json"
    assert main(["eval", str(folders.run), "--dataset", str(folders.corpus), "--window", "48", "--stride", "16",
                 "--batch-size", "4", "--max-tokens", "500", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folders.run), AutoTokenizer.from_pretrained(folders.run)
    direct = sliding_window_perplexity(model, tokenizer(folders.corpus.read_text())["input_ids"][:500], 48, 16)
    assert result["tokens"] == 499 and result["window"] == 48 and result["stride"] == 16
    assert result["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert "bpw" not in result and "flip_rate" not in result  # a dense model without recorded reference signs
    assert "| Perplexity |" in output.with_suffix(".md").read_text()
    assert f"perplexity {result['perplexity']:.4f}" in capsys.readouterr().out
    # the alias, defaults (the run's held-out text, window = the model's context) and eval.json beside the model
    assert main(["evaluate", str(folders.run), "--recorded_data", "--output", str(folders.run / "eval.json")]) == 0
    default = json.loads((folders.run / "eval.json").read_text())
    assert default["window"] == CONTEXT and default["stride"] == CONTEXT // 2 and "held-out" in default["dataset"]
    assert evaluate_folder(folders.run, write=False)["perplexity"] == pytest.approx(default["perplexity"], rel=1e-6)
    # a typed error is one line on stderr and exit code 2
    assert main(["eval", str(folders.run), "--window", "65"]) == 2
    assert "--window 65 is longer than the model's context" in capsys.readouterr().err


def test_eval_of_an_export_reports_its_bits(export, folders, tmp_path):
    from hf_signlock.quantization.bits import checkpoint_report

    output = tmp_path / "export.json"
    assert main(["eval", str(export), "--dataset", str(folders.corpus), "--max_tokens", "300",
                 "--output", str(output)]) == 0
    result, report = json.loads(output.read_text()), checkpoint_report(export)
    assert result["bpw"] == pytest.approx(report["bpw"]) and 0 < result["bpw"] < 32
    assert result["bits_per_parameter"] == pytest.approx(report["checkpoint"]["bits_per_parameter"])
    assert math.isfinite(result["perplexity"]) and result["tokens"] == 299
    assert "Bits per target weight" in output.with_suffix(".md").read_text()


def test_flip_rate_against_the_recorded_signs(export, folders):
    pytest.importorskip("hf_signlock.evaluation.references")
    pytest.importorskip("hf_signlock.evaluation.sign_metrics")
    from hf_signlock.quantization.bits import checkpoint_report

    result = evaluate_model(str(export), str(folders.corpus), max_tokens=200)
    stored = checkpoint_report(export)["total"]
    # the export's seed regenerates the reference: the flips counted are the flips it stores
    assert result["flips"] == stored["flips"] > 0 and result["weights"] == stored["weights"]
    assert result["flip_rate"] == pytest.approx(stored["flips"] / stored["weights"])


# --- the evaluate module ---------------------------------------------------------------------------------------------------


def test_evaluate_module_loads_by_path_and_matches(folders):
    evaluate = pytest.importorskip("evaluate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folders.run), AutoTokenizer.from_pretrained(folders.run)
    texts = [corpus_text(8), corpus_text(3)]
    ours = [sliding_window_perplexity(model, tokenizer(t)["input_ids"], 32, 8) for t in texts]
    for path in (METRIC, METRIC / "perplexity.py"):
        scores = evaluate.load(str(path)).compute(predictions=texts, model=model, tokenizer=tokenizer, window=32,
                                                  stride=8)
        assert scores["perplexities"] == pytest.approx([r["perplexity"] for r in ours], rel=1e-6)
        assert scores["tokens"] == sum(r["tokens"] for r in ours)
        assert scores["perplexity"] == pytest.approx(
            math.exp(sum(r["nll"] for r in ours) / sum(r["tokens"] for r in ours)), rel=1e-6)
    by_id = evaluate.load(str(METRIC)).compute(predictions=texts[:1], model_id=str(folders.run), window=32, stride=8)
    assert by_id["perplexity"] == pytest.approx(ours[0]["perplexity"], rel=1e-6)


# --- several processes (slow) ----------------------------------------------------------------------------------------------


def _torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_match_one(folders, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folders.run), AutoTokenizer.from_pretrained(folders.run)
    single = sliding_window_perplexity(model, tokenizer(folders.corpus.read_text())["input_ids"], 40, 8, batch_size=3)
    _torchrun([str(Path(__file__).with_name("perplexity_worker.py")), str(folders.run), str(folders.corpus), "40", "8",
               str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["tokens"] == single["tokens"]
        assert rank["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)
    assert sum(r["windows_here"] for r in ranks) == single["windows"]  # each window run once, by one rank
    assert abs(ranks[0]["windows_here"] - ranks[1]["windows_here"]) <= 1
    # the command under torchrun: only rank 0 writes, and it writes the one-process number
    output = tmp_path / "cli.json"
    _torchrun(["-m", "hf_signlock", "eval", str(folders.run), "--dataset", str(folders.corpus), "--window", "40",
               "--stride", "8", "--output", str(output)], tmp_path)
    assert json.loads(output.read_text())["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_stride_monotonicity_on_a_real_model():
    from real_model import smollm2_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_signlock.data import default_corpus_files

    folder = smollm2_folder()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(default_corpus_files()[-1].read_text()[-20000:])["input_ids"][-768:]
    values = [sliding_window_perplexity(model, ids, 128, stride, 8)["perplexity"] for stride in (127, 64, 32)]
    assert all(later < earlier for earlier, later in itertools.pairwise(values)), values
