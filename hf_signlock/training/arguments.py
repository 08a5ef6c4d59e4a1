"""``SignLockTrainingArguments``: ``TrainingArguments`` plus the sign lock-in knobs.

The defaults are the recommended method (gap-based init + outward drift), the one ``recipes/quickstart.yaml`` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..errors import SignLockConfigError
from ..signs import check_seed
from .gap_init import SIGN_SOURCES, check_gap
from .reference import REFERENCE_MODES


@dataclass
class SignLockTrainingArguments(TrainingArguments):
    # --- reference signs and initialisation -----------------------------------------------------------------------
    sign_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the reference signs (stored with exports). Defaults to `seed`."},
    )
    reference_mode: Literal["seed", "captured"] = field(
        default="seed",
        metadata={
            "help": "'seed': training from scratch; the target weights are re-initialised with seeded signs and the "
            "signs are regenerated, never stored. 'captured': fine-tuning; the starting weights' signs are the "
            "reference (1 bit per weight, saved with checkpoints)."
        },
    )
    init_weights: bool | None = field(
        default=None,
        metadata={
            "help": "With reference_mode='seed': re-initialise the target weights with the seeded gap init when the "
            "trainer is built. None (default): yes for a model built from a config (pretraining from scratch); "
            "no for a model whose signs already follow `sign_seed` (a seeded run, reloaded); a model loaded with "
            "from_pretrained otherwise stops with an error, since re-initialising it would discard its weights. "
            "True: re-initialise whatever the model is. False: never."
        },
    )
    gap: float = field(
        default=1.0,
        metadata={"help": "Gap of the init, in units of each tensor's init std: magnitudes start at >= gap * std."},
    )
    sign_source: Literal["seed", "template"] = field(
        default="seed",
        metadata={"help": "'seed': i.i.d. seeded signs. 'template': sign(U V^T) with seeded rank-r U, V."},
    )
    template_rank: int = field(default=8, metadata={"help": "Rank r of the 'template' sign source."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Target modules, PEFT-style: names matched exactly or as a '.name' suffix. Default: every "
            "linear projection inside the transformer blocks."
        },
    )
    target_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Also make the token embedding a target: seeded signs keyed by its parameter name, gap init with "
            "the std the model's own init gives it, drift and flip tracking (an LM head tied to it is the same "
            "tensor, counted once). The recipes turn it on, so that an export can be sub-bit over the whole file."
        },
    )
    target_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Also make an untied LM head a target. Off in the recipes: locking the head's signs cost the "
            "quickstart model 6.4% perplexity (4.4% with a smaller margin), where the token embedding cost 1.1%; "
            "export stores an unlocked head's signs packed, 1 bit each (docs/method.md)."
        },
    )
    init_std: float | None = field(
        default=None,
        metadata={
            "help": "Override the init std of every target (default: read from the model's _init_weights). In a "
            "captured run it also replaces the starting RMS as sigma, the unit of drift_margin and near_zero_band."
        },
    )
    # --- outward-drift regulariser --------------------------------------------------------------------------------
    drift_lambda: float = field(
        default=300.0,
        metadata={
            "help": "lambda of loss = task + lambda * R. R is a mean over all N target weights, so each weight inside "
            "the margin is pushed with lambda / N: lambda must be large (hundreds for a small model; 1e5 for "
            "SmolLM2-135M's 106M target weights) for that push to matter beside the task gradient. 0 turns it off."
        },
    )
    drift_margin: float = field(
        default=1.0,
        metadata={
            "help": "Margin d of R = mean relu(d * sigma_l - s0 * w), in units of each layer's sigma_l: its init std "
            "with reference_mode='seed'; with 'captured', the RMS of the layer's starting (pretrained) weights, "
            "since the config's initializer_range says nothing about them. The hinge acts on the weights with "
            "s0 * w < d * sigma_l (share at the start in signlock_stats.json: margin_share_at_start; SmolLM2-135M: "
            "4.4% at d=0.05, 8.8% at 0.1, 22% at 0.25, 41% at 0.5, 71% at 1). Fine-tuning wants a small d."
        },
    )
    # --- tracking ---------------------------------------------------------------------------------------------------
    flip_tracking_steps: int = field(
        default=10,
        metadata={"help": "Observe signs every this many optimizer steps (flip rate, crossing counts)."},
    )
    near_zero_band: float = field(
        default=0.1,
        metadata={"help": "`near_zero_fraction` counts target weights with |w| < band * sigma_l (see drift_margin)."},
    )
    save_initial_model: bool = field(
        default=False, metadata={"help": "Write the step-0 model to `output_dir/initial/`."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sign_seed is None:
            self.sign_seed = self.seed
        try:
            self.sign_seed = check_seed(self.sign_seed)
        except SignLockConfigError as error:
            raise SignLockConfigError(str(error).replace("`seed`", "`sign_seed`")) from None
        if self.reference_mode not in REFERENCE_MODES:
            raise SignLockConfigError(f"`reference_mode` must be one of {REFERENCE_MODES}, got {self.reference_mode!r}.")
        if self.sign_source not in SIGN_SOURCES:
            raise SignLockConfigError(f"`sign_source` must be one of {SIGN_SOURCES}, got {self.sign_source!r}.")
        check_gap(self.gap)
        for name in ("drift_lambda", "drift_margin", "near_zero_band"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SignLockConfigError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not (isinstance(self.flip_tracking_steps, int) and self.flip_tracking_steps >= 1):
            raise SignLockConfigError(
                f"`flip_tracking_steps` must be an integer >= 1, got {self.flip_tracking_steps!r}."
            )
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise SignLockConfigError("`target_modules` is an empty list; leave it unset for the default targets.")
