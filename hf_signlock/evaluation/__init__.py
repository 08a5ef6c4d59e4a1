"""Evaluation recipes: perplexity on any text, reference signs and sign metrics, ``analyze``, the ablation sweep.

Each part is a module of its own (see the README's layout table); the names most people need are re-exported here.
"""

from .analyze import analyze
from .perplexity import evaluate_folder, evaluate_model, perplexity, sliding_window_perplexity
from .references import ReferenceSigns, resolve_reference
from .sign_metrics import flip_rate, flip_report, spectral_ks_test
from .sweep import Sweep, SweepSpec, read_sweep, run_sweep

__all__ = ["analyze", "evaluate_folder", "evaluate_model", "perplexity", "sliding_window_perplexity",
           "ReferenceSigns", "resolve_reference", "flip_rate", "flip_report", "spectral_ks_test", "Sweep", "SweepSpec",
           "read_sweep", "run_sweep"]
