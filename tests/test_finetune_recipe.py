"""``recipes/finetune_smollm2.yaml`` on the real SmolLM2-135M (``scripts/get_smollm2.py``), cut to two short steps:
the run captures the pretrained signs, measures the drift margin in each layer's starting RMS (not the config's
initializer_range), records both in ``signlock_stats.json`` and writes a normal HF folder. The full recipe's figures
(200 steps, ~8 min on 2 cores) are in the README, not here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from real_model import smollm2_folder
from transformers import AutoModelForCausalLM

from hf_signlock.training.recipe import parse_recipe
from hf_signlock.training.run import run_training

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).parent.parent / "recipes" / "finetune_smollm2.yaml"
# Measured on the folder scripts/get_smollm2.py makes: the share of the 134,479,872 target weights (the 210
# projections and the tied token embedding, which the recipe makes a target) with |w| < 0.05 * RMS of their layer,
# and the range of the 211 layers' RMS.
SHARE_AT_D_005 = 0.0452
RMS_RANGE = (0.0468, 0.1901, 0.3978)  # min, median, max


def test_finetune_recipe_captures_signs_and_measures_the_margin_in_starting_rms(tmp_path):
    folder = smollm2_folder()
    out = tmp_path / "ft"
    flags = ["--model_name_or_path", str(folder), "--output_dir", str(out), "--max_steps", "2", "--warmup_steps", "0",
             "--block_size", "32", "--max_eval_blocks", "4", "--per_device_eval_batch_size", "4",
             "--flip_tracking_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true"]
    model_args, data_args, training_args = parse_recipe(RECIPE, flags)
    assert training_args.reference_mode == "captured" and training_args.drift_lambda > 0
    trainer = run_training(model_args, data_args, training_args)
    stats = json.loads((out / "signlock_stats.json").read_text())
    sigma = stats["drift_sigma"]
    assert sigma["source"] == "start_rms" and len(sigma["per_target"]) == 211
    assert "model.embed_tokens.weight" in sigma["per_target"] and stats["target_embeddings"]
    assert (sigma["min"], sigma["median"], sigma["max"]) == pytest.approx(RMS_RANGE, abs=2e-4)
    assert stats["margin_share_at_start"] == pytest.approx(SHARE_AT_D_005, abs=2e-4)
    # The pretrained weights that are exactly 0 (Q4_1 rounding) count as flipped at the start; the drift pushes them
    # out along +1, and two steps move nothing else across zero.
    zeros = stats["target_weights"] * 3.2e-4
    assert stats["flips"] <= zeros and math.isfinite(stats["eval_perplexity"])
    assert stats["model_name_or_path"] == str(folder)
    # A normal HF folder: it loads without hf_signlock's help, with the fine-tuned weights.
    loaded = AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.state_dict()[name], trainer.model.state_dict()[name].cpu())

