"""``SignLockTrainer``: the ``Trainer`` with seeded gap init, the outward-drift loss and flip tracking.

Read top to bottom: ``__init__`` initialises the targets and builds their reference signs; ``compute_loss`` adds
``lambda * R``; a callback observes the signs every ``flip_tracking_steps``; ``log`` adds ``drift_loss``,
``flip_rate`` and ``near_zero_fraction``; checkpoints carry the tracking state; ``train`` ends by writing
``signlock_stats.json``, which records each layer's sigma (the unit of the drift margin) and the share of the target
weights inside the margin at the start.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from importlib import metadata

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from ..constants import INITIAL_MODEL_DIR, STATE_NAME, STATS_NAME
from ..errors import NonFiniteLossError, SignLockConfigError
from ..signs import reference_signs
from ..targets import find_target_modules
from .arguments import SignLockTrainingArguments
from .drift import margin_share, outward_drift
from .gap_init import apply_gap_init
from .init_distribution import resolve_targets
from .reference import SignReference
from .tracking import FlipTracker

logger = logging.get_logger(__name__)

_HISTORY_KEYS = ("step", "loss", "drift_loss", "flip_rate", "near_zero_fraction")
_VERSIONED = ("hf-signlock", "torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors",
              "huggingface_hub", "numpy")


def library_versions() -> dict[str, str]:
    """Installed versions from package metadata (no git calls)."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class _FlipTrackingCallback(TrainerCallback):
    def __init__(self, tracker: FlipTracker, interval: int, expect_seeded: bool):
        self.tracker = tracker
        self.interval = interval
        self.expect_seeded = expect_seeded

    def on_train_begin(self, args, state, control, **kwargs):
        if self.tracker.last_step is None:  # a fresh run (a resumed one restored its tracker)
            observed = self.tracker.observe(state.global_step)
            if self.expect_seeded and observed["flip_rate"] > 0.01:
                logger.warning(
                    f"{observed['flip_rate']:.1%} of the target weights disagree with the seeded signs at the start. "
                    "This model was not initialised from `sign_seed`: use init_weights=True (from scratch) or "
                    "reference_mode='captured' (fine-tuning a pretrained model)."
                )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.interval == 0:
            self.tracker.observe(state.global_step)


class _SignLockProgressCallback(ProgressCallback):
    """The usual progress bar, with loss / drift loss / flip rate kept in its postfix."""

    _SHOWN = ("loss", "drift_loss", "flip_rate")

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix({k: f"{logs[k]:.4g}" for k in self._SHOWN if k in logs}, refresh=False)


_SEEDED_AGREEMENT = 0.99  # a model whose target signs follow the seed this closely was initialised from it


@torch.no_grad()
def _follows_seed(model, args: SignLockTrainingArguments) -> bool:
    """Whether the target weights' signs already agree with the seeded reference (a seeded run, reloaded)."""
    agree = total = 0
    for name, module in find_target_modules(model, args.target_modules, args.target_embeddings,
                                                   args.target_lm_head).items():
        weight = module.weight.detach()
        if weight.device.type == "meta":  # not materialised on this rank (FSDP cpu_ram_efficient_loading)
            return False
        reference = reference_signs(args.sign_seed, f"{name}.weight", weight.shape, args.sign_source,
                                    args.template_rank, device=weight.device)
        agree += int((reference * weight > 0).sum())
        total += weight.numel()
    return agree >= _SEEDED_AGREEMENT * total


def _should_initialise(model, args: SignLockTrainingArguments) -> bool:
    """``init_weights`` resolved: a pretrained model is never re-initialised unless the user asked for it."""
    if args.init_weights is not None:
        return args.init_weights
    if _follows_seed(model, args):
        return False
    source = getattr(model.config, "_name_or_path", "")
    if source:
        raise SignLockConfigError(
            f"This model was loaded from {source!r} and its weights do not follow sign_seed={args.sign_seed}; "
            "reference_mode='seed' would re-initialise them and discard what it learned. To fine-tune it, set "
            "reference_mode='captured' (its current signs become the reference). To train it from scratch on "
            "purpose (e.g. a model built from a pretrained config), set init_weights=True."
        )
    return True


class SignLockTrainer(Trainer):
    """The ``Trainer`` with seeded gap init, the outward-drift loss and flip tracking (see the module docstring).

    With ``reference_mode="seed"`` a model built from a config is initialised with seeded signs; a pretrained model
    is never re-initialised unless ``init_weights=True`` (see ``SignLockTrainingArguments``).
    """

    def __init__(self, model=None, args: SignLockTrainingArguments | None = None, **kwargs):
        if not isinstance(args, SignLockTrainingArguments):
            raise SignLockConfigError(
                f"SignLockTrainer needs `args` of type SignLockTrainingArguments, got {type(args).__name__}."
            )
        if model is None:
            raise SignLockConfigError("SignLockTrainer needs a `model` (model_init is not supported).")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size == 1:
            # Without this, every process would train its own copy on its own share of the data, silently.
            raise SignLockConfigError(
                f"Launched as {launched} processes, but TrainingArguments set up a single-process run. On a machine "
                "without GPUs set `use_cpu: true` (gloo data parallelism); otherwise check the accelerate config."
            )
        seeded = args.reference_mode == "seed"
        if seeded and _should_initialise(model, args):
            targets = apply_gap_init(
                model, args.sign_seed, args.gap, args.target_modules, args.sign_source, args.template_rank,
                init_std=args.init_std, embeddings=args.target_embeddings, lm_head=args.target_lm_head,
            )
        else:
            targets = resolve_targets(model, args.target_modules, init_std=args.init_std,
                                      embeddings=args.target_embeddings, lm_head=args.target_lm_head)
        super().__init__(model=model, args=args, **kwargs)
        if self.is_deepspeed_enabled:
            # ZeRO-3 flattens weights into buffers the drift term cannot address by row; FSDP2 keeps them as DTensors.
            raise SignLockConfigError(
                "SignLockTrainer supports one process, DDP (recipes/accelerate/multi_gpu.yaml) and FSDP2 "
                "(recipes/accelerate/fsdp.yaml); DeepSpeed is not supported. Launch with one of those configs."
            )
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise SignLockConfigError(
                "SignLockTrainer supports FSDP2 only (its weights stay addressable DTensor row shards); set "
                "`fsdp_version: 2` in the accelerate config, as recipes/accelerate/fsdp.yaml does."
            )
        if seeded:
            self.reference = SignReference.from_seed(targets, args.sign_seed, args.sign_source, args.template_rank)
        else:
            # A pretrained model's sigma is its starting weights' RMS, unless `init_std` states one on purpose.
            self.reference = SignReference.capture(targets, scale_from_weights=args.init_std is None)
        self.margin_share_at_start = margin_share(self.reference, args.drift_margin)
        self.tracker = FlipTracker(self.reference, args.near_zero_band)
        self.add_callback(_FlipTrackingCallback(self.tracker, args.flip_tracking_steps, expect_seeded=seeded))
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(_SignLockProgressCallback)
        self._drift_sum = torch.zeros((), device=args.device)
        self._drift_count = 0

    # --- loss -------------------------------------------------------------------------------------------------------

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether the task loss is already normalised over the whole accumulated batch (as ``training_step``
        decides it), in which case nobody divides our extra term by the accumulation steps but us."""
        # The override attribute is newer than transformers 5.17, whose training_step decides by the rule below alone.
        override = getattr(self, "loss_is_scaled_for_ga", None)
        if override is not None:
            return override
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training or self.args.drift_lambda == 0:
            return result  # evaluation reports the task loss alone
        loss, outputs = result if return_outputs else (result, None)
        drift = outward_drift(self.reference, self.args.drift_margin)
        self._drift_sum += drift.detach()
        self._drift_count += 1
        # One lambda * R per optimizer step: R is identical on every rank and DDP averages gradients, so it gets no
        # world-size factor (unlike the token-normalised task loss), only the accumulation split.
        weight = self.args.drift_lambda
        if self._task_loss_is_scaled_for_ga(num_items_in_batch):
            weight /= self.current_gradient_accumulation_steps
        loss = loss + weight * drift
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch=num_items_in_batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at step {self.state.global_step + 1}. Lower `learning_rate`, "
                "set `max_grad_norm` (e.g. 1.0), use fp32 or bf16 instead of fp16, or check the data for empty or "
                "corrupt examples."
            )
        return loss

    # --- logging ----------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every rank gets here, so the reduce below is safe
            if self._drift_count:
                mean = self._drift_sum / self._drift_count
                # Each rank holds all of R under DDP, its rows' share of R under FSDP.
                reduction = "sum" if self.reference.is_sharded() else "mean"
                logs["drift_loss"] = self.accelerator.reduce(mean, reduction).item()
                self._drift_sum.zero_()
                self._drift_count = 0
            if self.tracker.last:
                logs["flip_rate"] = self.tracker.last["flip_rate"]
                logs["near_zero_fraction"] = self.tracker.last["near_zero_fraction"]
        super().log(logs, start_time)

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.save_signlock_state(folder)

    def save_signlock_state(self, folder: str) -> None:
        """Write the tracking state (and captured reference signs) so that a resumed run continues it exactly.
        Every process calls this (FSDP shards are gathered); the main one writes."""
        tensors = {**self.tracker.state_dict(), **self.reference.state_dict()}
        if not self.args.should_save:
            return
        meta = {
            "format_version": "1",
            "reference_mode": self.reference.mode,
            "sign_seed": str(self.args.sign_seed),
            "last_step": json.dumps(self.tracker.last_step),
            "last": json.dumps(self.tracker.last),
        }
        if self.reference.scales:  # the starting RMS: a resumed run must keep the start's, not the checkpoint's
            meta["sigma"] = json.dumps(self.reference.scales)
        save_file(tensors, os.path.join(folder, STATE_NAME), metadata=meta)

    def load_signlock_state(self, folder: str) -> None:
        path = os.path.join(folder, STATE_NAME)
        if not os.path.exists(path):
            raise SignLockConfigError(
                f"{folder} has no {STATE_NAME}: it was not written by SignLockTrainer, so the flip tracking cannot "
                "continue. Resume from a SignLockTrainer checkpoint, or start a new run."
            )
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            meta = handle.metadata()
        if meta.get("reference_mode") != self.reference.mode or meta.get("sign_seed") != str(self.args.sign_seed):
            raise SignLockConfigError(
                f"{path} was saved with reference_mode={meta.get('reference_mode')!r}, "
                f"sign_seed={meta.get('sign_seed')}; this run has reference_mode={self.reference.mode!r}, "
                f"sign_seed={self.args.sign_seed}. Resume with the settings the checkpoint was trained with."
            )
        state = load_file(path)
        self.reference.load_state_dict(state)
        if "sigma" in meta and self.reference.scales:
            self.reference.scales.update(json.loads(meta["sigma"]))
        missing = [t.name for t in self.reference.targets if f"agree.{t.name}" not in state]
        if missing:
            raise SignLockConfigError(
                f"{path} has no tracking state for {missing[:3]}...: the checkpoint has other `target_modules`."
            )
        self.tracker.load_state_dict(state, json.loads(meta["last_step"]), json.loads(meta["last"]))

    # --- the run ------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise SignLockConfigError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint-* folder."
                )
        if resume_from_checkpoint:
            self.load_signlock_state(resume_from_checkpoint)
        elif self.args.save_initial_model:
            self._save_initial_model(os.path.join(self.args.output_dir, INITIAL_MODEL_DIR))
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self.tracker.last_step != self.state.global_step:
            self.tracker.observe(self.state.global_step)
        self.write_stats()
        return output

    def _save_initial_model(self, folder: str) -> None:
        if not self.is_fsdp_enabled:
            self.save_model(folder)
        elif self.args.should_save:  # FSDP wraps the model inside train(): here every rank still holds all of it
            self.model.save_pretrained(folder)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)

    def sigma_summary(self) -> dict:
        """Each target's sigma_l (the unit of ``drift_margin`` and ``near_zero_band``), where it comes from, and its
        range: ``source`` is "init_std" (seeded runs, or an explicit ``init_std``) or "start_rms" (captured runs)."""
        per_target = {t.name: self.reference.sigma(t) for t in self.reference.targets}
        values = list(per_target.values())
        return {"source": self.reference.sigma_source, "min": min(values), "median": statistics.median(values),
                "max": max(values), "per_target": per_target}

    def write_stats(self, path: str | None = None) -> dict:
        """Evaluate (if there is an eval set) and write ``signlock_stats.json``; returns what was written."""
        eval_loss = None
        if self.eval_dataset is not None:
            eval_loss = self.evaluate()["eval_loss"]
        args = self.args
        stats = {
            **self.tracker.summary(),
            "eval_loss": eval_loss,
            "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
            "seed": args.sign_seed,
            "reference_mode": args.reference_mode,
            # the model from_pretrained started from: a fine-tune's export stores its signs against that one's
            "model_name_or_path": getattr(getattr(self.model, "config", None), "_name_or_path", None) or None,
            "sign_source": args.sign_source,
            "template_rank": args.template_rank,
            "gap": args.gap,
            "drift_lambda": args.drift_lambda,
            "drift_margin": args.drift_margin,
            "drift_sigma": self.sigma_summary(),
            "margin_share_at_start": self.margin_share_at_start,
            "flip_tracking_steps": args.flip_tracking_steps,
            "target_modules": [t.name for t in self.reference.targets],
            "target_embeddings": args.target_embeddings,
            "target_lm_head": args.target_lm_head,
            "global_step": self.state.global_step,
            "history": [
                {k: entry[k] for k in _HISTORY_KEYS if k in entry}
                for entry in self.state.log_history
                if "loss" in entry
            ],
            "versions": library_versions(),
        }
        if args.should_save:
            path = path or os.path.join(args.output_dir, STATS_NAME)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as handle:
                json.dump(stats, handle, indent=2)
        return stats
