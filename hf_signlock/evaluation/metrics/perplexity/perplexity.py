"""Sliding-window perplexity as an ``evaluate`` module: ``evaluate.load("<this folder or this file>")``.

The computation is ``hf_signlock.evaluation.perplexity.sliding_window_perplexity`` (the Transformers perplexity
guide's sliding window, token-weighted), applied to each prediction on its own. Unlike the Hub's ``perplexity``
metric it loads offline, takes an already loaded model (a SignLock export loaded with ``from_pretrained`` after
``import hf_signlock``, or any causal LM) and reads each text in overlapping windows instead of truncating it.
"""

import datasets
import evaluate

# Importing hf_signlock registers the `signlock` quantization method: SignLock exports load by `model_id`.
# (No comment may follow an import on its line: evaluate reads such a comment as a download address.)
import hf_signlock

_VERSION = hf_signlock.__version__

_DESCRIPTION = """Perplexity of a causal language model on each input text: exp of the mean negative log-likelihood of
its tokens, each token after the first scored once, read in windows of `window` tokens that start `stride` tokens
apart (the Transformers perplexity guide's sliding window). `perplexity` weighs every token of every text alike;
`mean_perplexity` is the mean of the per-text values, as the Hub's `perplexity` metric reports it."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score; each needs at least two tokens.
    model: a loaded causal LM (`AutoModelForCausalLM.from_pretrained(...)`), or
    model_id (str): a local folder or Hub id to load (SignLock exports included); one of the two.
    tokenizer: the model's tokenizer (default: loaded from `model_id` or the model's `name_or_path`).
    window (int): tokens per forward pass; default the model's context, at most 1024.
    stride (int): tokens between window starts, 1 <= stride < window; default window // 2.
    batch_size (int): windows per forward pass (default 8).
    max_tokens (int): score only the first tokens of each text.
Returns:
    perplexity (float): exp(total NLL / total scored tokens) over all texts.
    tokens (int): scored tokens (each text's token count minus one, summed).
    perplexities (list of float): one per text.
    mean_perplexity (float): the mean of `perplexities`.
Examples:
    >>> import evaluate, hf_signlock
    >>> metric = evaluate.load("path/to/hf_signlock/evaluation/metrics/perplexity")
    >>> metric.compute(predictions=["Thou art more lovely and more temperate."], model_id="runs/quickstart", window=128, stride=64)
"""

_CITATION = """@misc{hf_signlock,
  title = {hf_signlock: sign lock-in for Hugging Face Transformers},
  note = {Sliding-window perplexity as in the Transformers documentation, "Perplexity of fixed-length models"}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Token-weighted sliding-window perplexity of a causal LM on each prediction (see the module's docstring)."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
            codebase_urls=[f"hf_signlock {_VERSION}: hf_signlock/evaluation/metrics/perplexity"],
        )

    def _compute(self, predictions, model=None, model_id=None, tokenizer=None, window=None, stride=None,
                 batch_size=8, max_tokens=None):
        """Score each prediction with ``sliding_window_perplexity``; see the keyword description above."""
        import math

        from transformers import AutoTokenizer

        from hf_signlock.errors import SignLockConfigError
        from hf_signlock.evaluation.loading import load_causal_lm
        from hf_signlock.evaluation.perplexity import default_window, model_context, sliding_window_perplexity
        from hf_signlock.text import tokenize_text

        if (model is None) == (model_id is None):
            raise SignLockConfigError("perplexity: pass exactly one of `model` (a loaded model) and `model_id`.")
        if not predictions:
            raise SignLockConfigError("perplexity: `predictions` is empty; pass at least one text.")
        if model is None:
            model = load_causal_lm(model_id, "model_id")
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_id or model.name_or_path)
        window, stride = default_window(model_context(model), window, stride)
        results = [sliding_window_perplexity(model, tokenize_text(tokenizer, text, max_tokens), window, stride,
                                             batch_size) for text in predictions]
        nll, tokens = sum(r["nll"] for r in results), sum(r["tokens"] for r in results)
        perplexities = [r["perplexity"] for r in results]
        return {"perplexity": math.exp(nll / tokens), "tokens": tokens, "perplexities": perplexities,
                "mean_perplexity": sum(perplexities) / len(perplexities)}
