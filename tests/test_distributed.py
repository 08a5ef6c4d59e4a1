"""Two-process CPU data parallelism (gloo) through `accelerate launch` matches one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

pytestmark = pytest.mark.slow

WORDS = ["thou", "art", "more", "lovely", "and", "more", "temperate", "rough", "winds", "do", "shake", "the", "darling", "buds", "of", "may"]


def _recipe(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 12)) + "\n" for i in range(600)))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""
dataset_name: null
data_files: [{corpus}]
tokenizer_vocab_size: 300
block_size: 32
hidden_size: 32
num_hidden_layers: 2
num_attention_heads: 4
intermediate_size: 64
max_steps: 8
learning_rate: 2.0e-2
logging_steps: 2
flip_tracking_steps: 2
drift_lambda: 100.0
gap: 0.5
target_embeddings: true
seed: 1
save_strategy: "no"
report_to: none
dataloader_pin_memory: false
ddp_find_unused_parameters: false
disable_tqdm: true
use_cpu: true
"""
    )
    return recipe


def _run(command, tmp_path):
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


def test_launch_without_cpu_flag_is_refused(tmp_path):
    """`--multi_gpu` on a machine without GPUs would give two independent single-process runs; it must stop."""
    recipe = _recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("use_cpu: true\n", ""))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_signlock", "train", "--config",
         str(recipe), "--output_dir", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode != 0 and "use_cpu: true" in result.stderr


def test_two_processes_match_one(tmp_path):
    recipe = _recipe(tmp_path)
    single, double = tmp_path / "single", tmp_path / "double"
    _run([sys.executable, "-m", "hf_signlock", "train", "--config", str(recipe), "--output_dir", str(single),
          "--per_device_train_batch_size", "8"], tmp_path)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "-m", "hf_signlock", "train", "--config", str(recipe), "--output_dir", str(double),
          "--per_device_train_batch_size", "4"], tmp_path)
    one, two = json.loads((single / "signlock_stats.json").read_text()), json.loads((double / "signlock_stats.json").read_text())
    assert one["global_step"] == two["global_step"] == 8
    card = ModelCard.load(single / "README.md")  # the run's model card carries its measured figures
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"perplexity": one["eval_perplexity"], "flip_rate": one["flip_rate"]}
    assert one["flips"] > 0  # the comparison is only meaningful if weights flipped
    # Same global batch, same data order: equal up to the float order of the gradient all-reduce.
    assert abs(one["flips"] - two["flips"]) <= 2
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [2, 4, 6, 8]
    for key in ("loss", "drift_loss"):
        assert [h[key] for h in two["history"]] == pytest.approx([h[key] for h in one["history"]], rel=1e-5)


@pytest.mark.gpu
def test_fsdp2_launch_matches_plain_run_on_gpu(tmp_path):
    """The Trainer path under `accelerate launch` with FSDP2 (accelerate has no FSDP on the CPU): one GPU process
    holds DTensor shards of the whole weight, and must report what the plain single-GPU run reports."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    recipe = _recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("use_cpu: true\n", ""))
    config = tmp_path / "fsdp.yaml"
    source = (Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml").read_text()
    config.write_text(source.replace("num_processes: 2", "num_processes: 1").replace("mixed_precision: bf16",
                                                                                    'mixed_precision: "no"'))
    plain, fsdp = tmp_path / "plain", tmp_path / "fsdp"
    _run([sys.executable, "-m", "hf_signlock", "train", "--config", str(recipe), "--output_dir", str(plain)], tmp_path)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "hf_signlock",
          "train", "--config", str(recipe), "--output_dir", str(fsdp)], tmp_path)
    one = json.loads((plain / "signlock_stats.json").read_text())
    two = json.loads((fsdp / "signlock_stats.json").read_text())
    assert two["global_step"] == one["global_step"] == 8
    assert abs(one["flips"] - two["flips"]) <= 2
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    drift_one, drift_two = ([h["drift_loss"] for h in run["history"]] for run in (one, two))
    assert drift_two == pytest.approx(drift_one, rel=1e-4)
