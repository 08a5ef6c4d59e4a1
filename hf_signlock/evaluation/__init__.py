"""Evaluation recipes: perplexity of a model folder (a run or an export) on held-out text."""

from .perplexity import evaluate_folder, perplexity

__all__ = ["evaluate_folder", "perplexity"]
