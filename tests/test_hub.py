"""Push an export to a Hub on loopback with the real client (`hf-signlock push` and `model.push_to_hub`), then
load it back with `from_pretrained(repo_id)` in a fresh process that only knows HF_ENDPOINT."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hub_server import LoopbackHub
from huggingface_hub import ModelCard
from test_quantizer import IDS, _run_folder, trained_model

pytestmark = pytest.mark.slow


def _client(hub, tmp_path, code):
    tests = os.path.dirname(__file__)  # the client imports the test helpers too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_loopback", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_cli_push_then_from_pretrained_repo_id(tmp_path):
    model, run = _run_folder(tmp_path)
    out = tmp_path / "export"
    with LoopbackHub() as hub:
        _client(hub, tmp_path, f"from hf_signlock.cli import main; main(['export', {str(run)!r}, {str(out)!r}, "
                               f"'--codec', 'exact']); main(['push', {str(out)!r}, 'me/tiny-signlock'])")
        files = hub.repos["me/tiny-signlock"]
        assert {"config.json", "model.safetensors", "bpw.json", "README.md"} <= set(files)
        card = ModelCard(files["README.md"].decode())
        metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert metrics["bits_per_weight"] == json.loads(files["bpw.json"])["bpw"]
        assert "pip install hf-signlock" in card.text and 'from_pretrained("me/tiny-signlock")' in card.text
        logits = tmp_path / "logits.pt"
        _client(hub, tmp_path, "import hf_signlock, torch; from transformers import AutoModelForCausalLM\n"
                               "m = AutoModelForCausalLM.from_pretrained('me/tiny-signlock')\n"
                               f"torch.save(m(torch.tensor({IDS.tolist()})).logits, {str(logits)!r})")
    assert torch.equal(torch.load(logits), model(IDS).logits)  # exact codec: bit-identical through the Hub


def test_push_to_hub_from_python(tmp_path):
    dense = trained_model("llama")(IDS).logits
    with LoopbackHub() as hub:
        code = ("import torch, hf_signlock; from test_quantizer import trained_model, SEED\n"
                "m = hf_signlock.quantize_model(trained_model('llama'), hf_signlock.SignLockConfig(seed=SEED, codec='exact'))\n"
                "hf_signlock.push_to_hub(m, 'me/from-python')\n"
                "from transformers import AutoModelForCausalLM\n"
                "back = AutoModelForCausalLM.from_pretrained('me/from-python')\n"
                f"torch.save(back(torch.tensor({IDS.tolist()})).logits, 'logits.pt')")
        _client(hub, tmp_path, code)
        assert "README.md" in hub.repos["me/from-python"] and "bpw.json" in hub.repos["me/from-python"]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), dense)
