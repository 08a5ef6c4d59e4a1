"""The lm-evaluation-harness recipe (docs/evaluation.md): `HFLM` on a loaded model with the local rolling-loglikelihood
task of recipes/lm_eval/signlock_text.yaml, offline, gives our sum of NLL where the windows are the same.

lm-eval's `loglikelihood_rolling` prepends one prefix token (BOS, else EOS) and cuts the text into disjoint runs of
`max_length` predicted tokens, each conditioned on the run before it; the last run is read with a full window of
context. Ours reads [prefix] + text with window = max_length + 1 and stride = max_length: the same windows, except
that our last window starts where the guide's loop puts it. With a text of a multiple of max_length tokens the two
are the same computation.
"""

import math
import re
from pathlib import Path

import pytest
import yaml
from perplexity_worker import corpus_text, tiny_model_folder

lm_eval = pytest.importorskip("lm_eval")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "lm_eval" / "signlock_text.yaml"
MAX_LENGTH = 32


def test_harness_rolling_loglikelihood_equals_our_nll(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_signlock.evaluation.perplexity import sliding_window_perplexity

    folder = tiny_model_folder(tmp_path / "model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    words = corpus_text(40).split(" ")
    for count in range(60, len(words)):  # a text of a whole number of windows: every window the same on both sides
        text = " ".join(words[:count])
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) % MAX_LENGTH == 0:
            break
    else:
        pytest.fail("no prefix of the corpus has a multiple of MAX_LENGTH tokens")
    (tmp_path / "heldout.txt").write_text(text)
    task = yaml.safe_load(RECIPE.read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "heldout.txt")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "signlock_text.yaml").write_text(yaml.safe_dump(task))

    harness = HFLM(pretrained=model, tokenizer=tokenizer, max_length=MAX_LENGTH, batch_size=4, device="cpu")
    out = lm_eval.simple_evaluate(model=harness, tasks=["signlock_text"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    loglikelihood = out["samples"]["signlock_text"][0]["filtered_resps"][0]
    ours = sliding_window_perplexity(model, [harness.prefix_token_id] + tokens, MAX_LENGTH + 1, MAX_LENGTH, 4)
    assert ours["tokens"] == len(tokens) and ours["windows"] == len(tokens) // MAX_LENGTH
    assert -loglikelihood == pytest.approx(ours["nll"], rel=1e-5)
    words = len(re.split(r"\s+", text))  # the harness's own perplexity: per word of the document
    assert out["results"]["signlock_text"]["word_perplexity,none"] == pytest.approx(math.exp(ours["nll"] / words),
                                                                                     rel=1e-5)
