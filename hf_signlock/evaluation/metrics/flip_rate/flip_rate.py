"""Flip rate: the fraction of weights whose sign disagrees with their reference signs, as an ``evaluate`` module.

Load it offline by path (``hf_signlock`` must be importable)::

    import evaluate
    flip_rate = evaluate.load("path/to/hf_signlock/evaluation/metrics/flip_rate")

Two ways to call it (see README.md):

- weights and reference signs: ``flip_rate.compute(predictions=weights, references=signs)``, flat sequences of the
  same length (``add_batch`` works too, one layer at a time): floats, and reference signs as +1 / -1 (any positive
  value counts as +1). A weight with ``w * s0 <= 0`` is flipped; zero counts as flipped.
- a model and where its reference signs come from: ``flip_rate.compute(model="runs/quickstart", reference="seed:0")``
  (``reference`` may be left out: the seed the run or export records), with the sources of ``hf-signlock eval
  --reference``: ``seed:N``, a dense checkpoint (initial or base model), a SignLock export.

Returns ``flip_rate``, ``flips`` and ``weights``; with ``model``, also ``reference`` (its description) and
``layers`` (each target's flip rate).
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@article{sakai2026signlockin,
  title={Sign Lock-In: Randomly Initialized Weight Signs Persist and Bottleneck Sub-Bit Model Compression},
  author={Sakai, Akira and Ichikawa, Yuma},
  journal={arXiv preprint arXiv:2602.17063},
  year={2026}
}
"""

_DESCRIPTION = """\
Effective flip rate: flips / weights, a flip being a weight whose sign disagrees with its reference sign (its sign at
initialisation, or the stored sign of a SignLock export): w * s0 <= 0, so zero counts as flipped.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): weights, flattened.
    references (`list` of `int`): reference signs, +1 or -1, one per weight.
    model (`str`, optional): instead of predictions/references, a model folder or Hub id (a run, an export, a
        pretrained model); its target layers are compared with `reference`.
    reference (`str` or `int`, optional): with `model`: seed:N, a checkpoint folder or Hub id, or a SignLock export;
        default: what the model records.
Returns:
    flip_rate (`float`): flips / weights.
    flips (`int`): weights whose sign disagrees with the reference.
    weights (`int`): weights compared.
Examples:
    >>> flip_rate = evaluate.load("hf_signlock/evaluation/metrics/flip_rate")
    >>> flip_rate.compute(predictions=[0.5, -0.2, 0.0, 0.1], references=[1, 1, 1, -1])
    {'flip_rate': 0.75, 'flips': 3, 'weights': 4}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FlipRate(evaluate.Metric):
    """Flip rate of weights against reference signs, or of a model folder against its reference."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float32"),
                                        "references": datasets.Value("int8")}),
            reference_urls=["https://arxiv.org/abs/2602.17063"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """As ``evaluate.Metric.compute``; with ``model=`` (and no predictions), the model's flip rate."""
        if "model" in kwargs and predictions is None and references is None:
            # nothing to collect: the weights are read from the model folder, not passed through Arrow
            return self._compute_model(kwargs["model"], kwargs.get("reference"))
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references):
        weights = np.asarray(predictions, dtype=np.float32)
        signs = np.asarray(references)
        if weights.shape != signs.shape:
            raise ValueError(f"predictions ({weights.shape}) and references ({signs.shape}) differ in length")
        if weights.size == 0:
            raise ValueError("flip_rate of no weights")
        agree = np.where(signs > 0, weights > 0, weights < 0)  # zero counts as flipped
        flips = int(weights.size - agree.sum())
        return {"flip_rate": flips / weights.size, "flips": flips, "weights": int(weights.size)}

    @staticmethod
    def _compute_model(model_source, reference=None):
        from hf_signlock.errors import SignLockConfigError
        from hf_signlock.evaluation.loading import load_causal_lm
        from hf_signlock.evaluation.references import resolve_reference
        from hf_signlock.evaluation.sign_metrics import flip_report

        model = load_causal_lm(str(model_source), "model")
        resolved = resolve_reference(str(model_source), reference, model)
        if resolved is None:
            raise SignLockConfigError(
                f"model {str(model_source)!r} records no reference signs (no seed, no captured signs): pass "
                "reference='seed:N', a checkpoint it was trained from, or a SignLock export."
            )
        return flip_report(model, resolved)
