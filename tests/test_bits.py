"""Honest bits: every byte of a SignLock checkpoint is counted once, and what the target layers add is what the
budget bounds. Checked against the files' own bytes, not against the code that counts them."""

import json
import struct

import pytest
from test_quantizer import SEED, trained_model
from transformers import GPT2Config, LlamaConfig

from hf_signlock import SignLockConfig, checkpoint_report, quantize_model
from hf_signlock.quantization.bits import config_entry_bytes, header_entry_bytes
from hf_signlock.quantization.format.guard import GUARD_KEY

CONFIGS = {
    "llama": LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64),
    "gpt2": GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                       eos_token_id=0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def export(request, tmp_path_factory):
    model = trained_model(request.param, CONFIGS[request.param], moved=0.3)
    quantize_model(model, SignLockConfig(seed=SEED, codec="vq", bits_per_weight=1.0))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, max_shard_size="100KB")  # several files: the counting must follow the shards
    return folder, checkpoint_report(folder)


def _headers(folder):
    for path in sorted(folder.glob("*.safetensors")):
        raw = path.read_bytes()
        length = struct.unpack("<Q", raw[:8])[0]
        yield path, length, json.loads(raw[8 : 8 + length])


def test_every_byte_is_counted_once(export):
    folder, report = export
    targets = {name.removesuffix("weight") for name in report["layers"]}
    target_bytes = other_bytes = 0.0
    for path, length, header in _headers(folder):
        metadata = header.pop("__metadata__")
        framing = length - sum(header_entry_bytes(k, v["dtype"], v["shape"], *v["data_offsets"])
                               for k, v in header.items())
        metadata_entry = len(json.dumps({"__metadata__": metadata}, separators=(",", ":"))) - 1  # with its comma
        framing -= metadata_entry
        assert 0 < framing <= 2 + 7  # the outer braces and up to 7 spaces of padding: the entries are exact
        other_bytes += 8 + metadata_entry + framing
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            size = end - begin + header_entry_bytes(key, entry["dtype"], entry["shape"], begin, end)
            if key.rpartition(".")[0] + "." in targets or key == GUARD_KEY or key in report["layers"]:
                target_bytes += size  # payloads (under the weights' names), biases of targets, and the guard
            else:
                other_bytes += size
    config = json.loads((folder / "config.json").read_text())
    quantization = config_entry_bytes("quantization_config", config["quantization_config"])
    other_bytes += (folder / "config.json").stat().st_size - quantization
    target_bytes += quantization
    assert report["checkpoint"]["target_bytes"] == pytest.approx(target_bytes, abs=1e-6)
    other_files = sum(size for name, size in report["checkpoint"]["files"].items()
                      if name not in ("config.json", "*.safetensors"))
    assert report["checkpoint"]["rest_bytes"] == pytest.approx(other_bytes + other_files, abs=1e-6)
    assert report["checkpoint"]["bytes"] == sum(p.stat().st_size for p in folder.iterdir()
                                                if p.suffix == ".safetensors" or p.name in report["checkpoint"][
                                                    "files"])


def test_the_budget_bounds_the_whole_and_shares_the_magnitude_bits(export):
    _, report = export
    assert 0.8 < report["bpw"] <= 1.0
    total = report["total"]
    # what the signs, biases and records leave is shared alike: no layer's magnitudes take more than their share
    per_weight = (1.0 * total["weights"] - total["sign_bits"] - total["other_bits"]) / total["weights"]
    for name, layer in report["layers"].items():
        assert layer["magnitude_bits"] <= per_weight * layer["weights"], name
        assert layer["other_bits"] > 0 and layer["sign_bits"] > 0 and layer["magnitude_bits"] > 0, name


def test_whole_checkpoint_bits_per_parameter(export):
    _, report = export
    checkpoint = report["checkpoint"]
    assert checkpoint["bits_per_parameter"] == 8 * checkpoint["bytes"] / checkpoint["parameters"]
    # embeddings, head and norms stay dense (fp32 here): more bits per parameter than the target layers take
    assert checkpoint["bits_per_parameter"] > report["bpw"]
    assert checkpoint["bytes"] < checkpoint["dense_bf16_bytes"]
