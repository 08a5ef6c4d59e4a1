"""Push to a Hub on loopback with the real client (``hf_signlock.push_to_hub``, ``hf-signlock push`` and transformers'
own ``model.push_to_hub``), then load back with ``from_pretrained(repo_id)`` in a fresh process that only knows
HF_ENDPOINT. Each client process costs seconds of imports, so each test pushes everything in one and loads
everything in another."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import LoopbackHub
from huggingface_hub import ModelCard
from test_quantizer import IDS, _run_folder, trained_model

from hf_signlock import SignLockError
from hf_signlock.hub import push_folder, push_to_hub
from hf_signlock.quantization.export import export_run

SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
PRELUDE = """\
import json, torch, hf_signlock
from transformers import AutoModelForCausalLM
from test_quantizer import IDS, SEED, assert_same_signs, dense_weights, trained_model
EXACT = hf_signlock.SignLockConfig(seed=SEED, codec='exact')
"""


def _client(hub, tmp_path, code):
    """Run ``code`` (after PRELUDE) in a fresh process whose Hub is ``hub``; returns its stdout."""
    tests = os.path.dirname(__file__)  # the client imports the test helpers too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
           "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_loopback", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _card(files) -> ModelCard:
    return ModelCard(files["README.md"].decode())


def _metrics(card) -> dict:
    """metric type -> (value, the dataset the card says it was measured on)."""
    return {r.metric_type: (r.metric_value, r.dataset_name) for r in card.data.eval_results}


@pytest.mark.slow
def test_push_to_hub_honours_every_argument(tmp_path):
    pushed = """
        m = hf_signlock.quantize_model(trained_model('llama'), EXACT)
        dev = hf_signlock.push_to_hub(m, 'me/args', revision='dev', max_shard_size='20KB', private=True,
                                      token='hf_other', commit_message='Weights for dev',
                                      commit_description='exact codec', tags=['extra-tag'])
        pr = hf_signlock.push_to_hub(m, 'me/args', create_pr=True, commit_message='Propose for main')
        print(json.dumps({'dev': dev, 'pr': pr}))
    """
    loaded = """
        torch.save({rev: AutoModelForCausalLM.from_pretrained('me/args', revision=rev)(IDS).logits
                    for rev in ('dev', 'refs/pr/1')}, 'logits.pt')
    """
    with LoopbackHub() as hub:
        urls = json.loads(_client(hub, tmp_path, pushed).splitlines()[-1])
        _client(hub, tmp_path, loaded)
        repo = hub.repos["me/args"]
    assert repo.private
    assert repo.files("main") == {}  # the branch push and the pull request both left main alone
    dev = repo.files("dev")
    shards = sorted(path for path in dev if SHARD.fullmatch(path))
    assert len(shards) >= 2 and "model.safetensors" not in dev
    assert sorted(set(json.loads(dev["model.safetensors.index.json"])["weight_map"].values())) == shards
    assert {"config.json", "bpw.json", "README.md"} <= set(dev)
    assert _metrics(_card(dev))["bits_per_weight"][0] == json.loads(dev["bpw.json"])["bpw"]  # counted over the shards
    assert {"extra-tag", "hf-signlock", "signlock", "sub-bit"} <= set(_card(dev).data.tags)
    assert repo.commits == [
        {"revision": "dev", "summary": "Weights for dev", "description": "exact codec", "pr_url": None,
         "authorization": "Bearer hf_other"},
        {"revision": "refs/pr/1", "summary": "Propose for main", "description": "",
         "pr_url": f"{hub.url}/me/args/discussions/1", "authorization": "Bearer hf_loopback"},
    ]
    assert urls == {"dev": f"{hub.url}/me/args/commit/{repo.refs['dev']}", "pr": f"{hub.url}/me/args/discussions/1"}
    assert {"config.json", "model.safetensors", "bpw.json", "README.md"} <= set(repo.files("refs/pr/1"))
    logits = torch.load(tmp_path / "logits.pt")
    dense = trained_model("llama")(IDS).logits
    assert torch.equal(logits["dev"], dense) and torch.equal(logits["refs/pr/1"], dense)  # exact codec: bit-identical


@pytest.mark.slow
def test_cli_push_honours_revision_pr_message_and_base_model(tmp_path):
    model, run = _run_folder(tmp_path)
    out = tmp_path / "export"
    export_run(run, out, codec="exact", dtype="float32")  # norms kept in float32: the logits stay bit-identical
    checksum = json.loads((out / "config.json").read_text())["quantization_config"]["config_checksum"]
    evaluation = {"perplexity": 61.25, "eval_loss": 4.115, "tokens": 1024, "blocks": 8, "checkpoint_checksum": checksum,
                  "dataset": "Shakespeare, held-out split (the last 5% of the text), 128-token blocks"}
    (out / "eval.json").write_text(json.dumps(evaluation))
    pushed = f"""
        from hf_signlock.cli import main
        assert main(['push', {str(out)!r}, 'me/cli', '--private']) == 0
        assert main(['push', {str(out)!r}, 'me/cli', '--revision', 'dev', '--commit_message', 'CLI to dev',
                     '--commit_description', 'from the CLI', '--base_model', 'org/base', '--tags', 'extra']) == 0
        assert main(['push', {str(out)!r}, 'me/cli', '--create_pr', '--commit_message', 'CLI pull request']) == 0
    """
    loaded = """
        torch.save({rev: AutoModelForCausalLM.from_pretrained('me/cli', revision=rev)(IDS).logits
                    for rev in ('main', 'dev')}, 'logits.pt')
    """
    with LoopbackHub() as hub:
        printed = _client(hub, tmp_path, pushed).splitlines()
        _client(hub, tmp_path, loaded)
        repo = hub.repos["me/cli"]
    assert repo.private
    assert [(c["revision"], c["summary"], c["description"]) for c in repo.commits] == [
        ("main", "Upload SignLock model", ""), ("dev", "CLI to dev", "from the CLI"),
        ("refs/pr/1", "CLI pull request", "")]
    assert printed[-1] == repo.commits[-1]["pr_url"] == f"{hub.url}/me/cli/discussions/1"
    assert printed[0] == f"{hub.url}/me/cli/commit/{repo.refs['main']}"  # main is still at the first push's commit

    main_card, dev_card = _card(repo.files("main")), _card(repo.files("dev"))
    assert main_card.data.base_model is None  # the run was not fine-tuned from a Hub model, and none was named
    assert "pip install hf-signlock" in main_card.text and 'from_pretrained("me/cli")' in main_card.text
    assert "AutoTokenizer" not in main_card.text  # the export has no tokenizer: the card shows no snippet that fails
    data = dev_card.data
    assert (data.base_model, data.base_model_relation) == ("org/base", "quantized")
    assert (data.pipeline_tag, data.library_name) == ("text-generation", "transformers")
    assert "extra" in data.tags and "[org/base](https://huggingface.co/org/base)" in dev_card.text
    metrics = _metrics(dev_card)
    assert metrics["perplexity"] == (evaluation["perplexity"], evaluation["dataset"])
    assert metrics["bits_per_weight"] == (json.loads(repo.files("dev")["bpw.json"])["bpw"], evaluation["dataset"])
    assert f"on {evaluation['dataset']}" in dev_card.text
    logits = torch.load(tmp_path / "logits.pt")
    assert torch.equal(logits["main"], model(IDS).logits) and torch.equal(logits["dev"], model(IDS).logits)


@pytest.mark.slow
def test_transformers_push_and_quantize_on_load_from_a_model_id(tmp_path):
    pushed = """
        trained_model('llama').push_to_hub('me/dense')  # transformers' own push, of a dense model
        hf_signlock.quantize_model(trained_model('llama'), EXACT).push_to_hub('me/transformers-push')
    """
    loaded = """
        dense = AutoModelForCausalLM.from_pretrained('me/dense')
        packed = hf_signlock.SignLockConfig(sign_source='packed', codec='exact')
        q = AutoModelForCausalLM.from_pretrained('me/dense', quantization_config=packed)  # quantized on load
        layers = {f'{n}.weight': m for n, m in q.named_modules() if isinstance(m, hf_signlock.SignLockLinear)}
        assert sorted(layers) == sorted(dense_weights(dense)), sorted(layers)
        assert_same_signs({n: m.decode_weight() for n, m in layers.items()}, dense_weights(dense))
        q.save_pretrained('quantized')
        again = AutoModelForCausalLM.from_pretrained('quantized')
        back = AutoModelForCausalLM.from_pretrained('me/transformers-push')
        torch.save({'dense': dense(IDS).logits, 'quantized': q(IDS).logits, 'reloaded': again(IDS).logits,
                    'transformers-push': back(IDS).logits}, 'logits.pt')
        hf_signlock.push_to_hub(q, 'me/dense-signlock')  # base_model: the id it was loaded from
    """
    with LoopbackHub() as hub:
        _client(hub, tmp_path, pushed)
        _client(hub, tmp_path, loaded)
        dense_files = hub.repos["me/dense"].files()
        pushed_files = hub.repos["me/transformers-push"].files()
        card = _card(hub.repos["me/dense-signlock"].files())
    assert "quantization_config" not in json.loads(dense_files["config.json"])
    assert json.loads(pushed_files["config.json"])["quantization_config"]["quant_method"] == "signlock"
    assert "model.safetensors" in pushed_files
    assert {"hf-signlock", "signlock"} <= set(_card(pushed_files).data.tags)  # transformers' card, our model's tags
    assert (card.data.base_model, card.data.base_model_relation) == ("me/dense", "quantized")  # the id it loaded from
    logits = torch.load(tmp_path / "logits.pt")
    expected = trained_model("llama")(IDS).logits
    for name, value in logits.items():
        assert torch.equal(value, expected), name


def test_push_refuses_what_is_not_a_signlock_export(tmp_path):
    model, run = _run_folder(tmp_path)
    with pytest.raises(SignLockError, match="is not a SignLock export.*hf-signlock export RUN_DIR OUT_DIR"):
        push_folder(run, "me/never")  # refused before the Hub is contacted
    with pytest.raises(SignLockError, match="is not a SignLock model.*quantize_model"):
        push_to_hub(model, "me/never")
    export_run(run, tmp_path / "out", codec="scale")
    (tmp_path / "out" / "bpw.json").unlink()
    with pytest.raises(SignLockError, match="has no bpw.json.*write_bits_report"):
        push_folder(tmp_path / "out", "me/never")
