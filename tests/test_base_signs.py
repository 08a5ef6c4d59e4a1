"""Signs stored against a base model (``sign_source="base"``): a fine-tune of a tiny Llama exported against its dense
base, its sign pack, and a loopback Hub repo at a revision decodes to the fine-tune's exact signs and logits at a
fraction of a bit per weight; a missing base, a base of another architecture or with other signs is refused with a
typed error naming the fix; the base can be found elsewhere at load time."""

import copy
import json
import math
import shutil

import pytest
import torch
from hub_server import LoopbackHub
from huggingface_hub import HfApi
from safetensors import safe_open
from test_quantizer import IDS
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_signlock import SignLockConfig, SignLockConfigError, quantize_model
from hf_signlock.cli import main
from hf_signlock.constants import SIGN_PACK_NAME, STATS_NAME
from hf_signlock.errors import (
    BaseArchitectureError,
    BaseModelError,
    BaseModelNotFoundError,
    BaseSignsMismatchError,
)
from hf_signlock.quantization.base_signs import clear_base_signs_cache, save_sign_pack, weight_sign_bits
from hf_signlock.quantization.bits import write_bits_report
from hf_signlock.quantization.export import export_run
from hf_signlock.quantization.format.flip_coding import encode_flips
from hf_signlock.quantization.linear import SignLockLinear
from hf_signlock.signs import pack_signs
from hf_signlock.targets import find_target_modules

FLIP_SHARE = 1e-3  # of the fine-tune's target signs that differ from the base's


def llama(hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64)


def base_model(hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(llama(hidden)).eval()


def fine_tune(base, flip_share: float = FLIP_SHARE, seed: int = 1):
    """``base`` with its target magnitudes moved by up to 20% and ``flip_share`` of their signs flipped."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in find_target_modules(model).values():
            flat = module.weight.view(-1)
            flat.mul_(1 + 0.2 * torch.rand(flat.shape, generator=generator))
            flipped = torch.randperm(flat.numel(), generator=generator)[: max(1, round(flat.numel() * flip_share))]
            flat[flipped] = -flat[flipped]
    return model


def target_signs(model) -> dict[str, torch.Tensor]:
    """Every target weight's sign as export counts it (zero is +1)."""
    return {name: module.weight.detach() >= 0 for name, module in find_target_modules(model).items()}


def export(model, folder, **config):
    """``model`` (copied) compressed with the exact codec and saved to ``folder``; returns the folder."""
    model = quantize_model(copy.deepcopy(model), SignLockConfig(codec="exact", **config))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base saved dense, its sign pack (written by the CLI), the fine-tune in memory and its packed export."""
    clear_base_signs_cache()
    root = tmp_path_factory.mktemp("base-signs")
    base = base_model()
    base.save_pretrained(root / "base")
    assert main(["signs", str(root / "base"), str(root / "pack")]) == 0
    tuned = fine_tune(base)
    export(tuned, root / "packed", sign_source="packed")
    return {"root": root, "base": base, "tuned": tuned, "logits": tuned(IDS).logits.detach()}


def flips_of(tuned, base) -> dict[str, int]:
    ours, theirs = target_signs(tuned), target_signs(base)
    return {name: int((ours[name] != theirs[name]).sum()) for name in ours}


def assert_exact(folder, setup, **loading):
    """``folder`` loads (dense and compressed) to the fine-tune's exact signs and logits, those of its packed export."""
    packed = AutoModelForCausalLM.from_pretrained(setup["root"] / "packed")(IDS).logits
    dense = AutoModelForCausalLM.from_pretrained(folder, **loading)
    assert not any(isinstance(m, SignLockLinear) for m in dense.modules())
    assert all(torch.equal(signs, target_signs(setup["tuned"])[name]) for name, signs in target_signs(dense).items())
    assert torch.equal(dense(IDS).logits, packed) and torch.equal(packed, setup["logits"])
    config = loading.pop("quantization_config", None) or SignLockConfig()
    config.dequantize = False
    compressed = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, **loading)
    assert torch.equal(compressed(IDS).logits, setup["logits"])


@pytest.mark.parametrize("where", ["base", "pack"])
def test_export_against_the_base_decodes_the_fine_tunes_signs(setup, where):
    root = setup["root"]
    folder = export(setup["tuned"], root / f"against-{where}", sign_source="base", base_model=str(root / where))
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (quantization["sign_source"], quantization["base_model"]) == ("base", str(root / where))
    with pytest.raises(BaseModelNotFoundError, match="outside the checkpoint's folder.*SignLockConfig\\(base_model="):
        AutoModelForCausalLM.from_pretrained(folder)  # a path the file names is not followed on its word
    assert_exact(folder, setup, quantization_config=SignLockConfig(base_model=str(root / where)))

    # the signs cost what the coded flips against the base cost: far below packed signs' 1 bit per weight
    report, packed = write_bits_report(folder), write_bits_report(root / "packed")
    flips = flips_of(setup["tuned"], setup["base"])
    assert report["total"]["flips"] == sum(flips.values()) > 0
    base = target_signs(setup["base"])
    coded = sum(8 * len(encode_flips(torch.nonzero((signs != base[name]).reshape(-1)).reshape(-1).numpy(),
                                     signs.numel())) for name, signs in target_signs(setup["tuned"]).items())
    assert report["total"]["sign_bits"] == coded
    weights = report["total"]["weights"]
    assert coded / weights < 0.1 and packed["total"]["sign_bits"] == weights
    assert report["bpw"] < packed["bpw"] - 0.8  # (the config's few more characters are spread over tiny layers)


def test_sign_pack_holds_one_bit_per_weight(setup):
    pack = setup["root"] / "pack" / SIGN_PACK_NAME
    targets = find_target_modules(setup["base"], None, embeddings=True)  # a pack holds the embedding's signs too
    numel = {f"{name}.weight": module.weight.numel() for name, module in targets.items()}
    with safe_open(str(pack), "pt") as handle:
        meta = handle.metadata()
        assert set(handle.keys()) == set(numel)
        assert all(handle.get_slice(name).get_shape() == [math.ceil(n / 8)] for name, n in numel.items())
    assert (meta["format"], meta["format_version"], meta["source_model"]) == (
        "signlock-sign-pack", "2", str(setup["root"] / "base"))
    assert [name for name, _ in json.loads(meta["shapes"])] == list(numel)  # in target order
    data = sum(math.ceil(n / 8) for n in numel.values())
    assert data < pack.stat().st_size < data + 4096  # the signs and a small header
    # a model in memory gives the same pack; a SignLock checkpoint the pack of its decoded signs
    checksums = {}
    for name, source in (("base", setup["base"]), ("tuned", setup["tuned"]), ("export", setup["root"] / "packed")):
        save_sign_pack(source, setup["root"] / f"pack-{name}", target_embeddings=False)  # the export's targets
        with safe_open(str(setup["root"] / f"pack-{name}" / SIGN_PACK_NAME), "pt") as handle:
            checksums[name] = handle.metadata()["signs_checksum"]
    assert checksums["tuned"] == checksums["export"] != checksums["base"]


def test_a_hub_base_at_a_revision_and_a_hub_sign_pack(setup, tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = setup["root"]
    with LoopbackHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        api = HfApi(endpoint=hub.url, token="hf_loopback")
        for repo, folder, branch in (("me/base", root / "base", "dev"), ("me/base-signs", root / "pack", None)):
            api.create_repo(repo)
            if branch:
                api.create_branch(repo, branch=branch)
            api.upload_folder(repo_id=repo, folder_path=str(folder), revision=branch)
        clear_base_signs_cache()
        dense = export(setup["tuned"], tmp_path / "hub-dense", sign_source="base", base_model="me/base",
                       base_revision="dev")
        pack = export(setup["tuned"], tmp_path / "hub-pack", sign_source="base", base_model="me/base-signs")
        clear_base_signs_cache()  # loading reads the base again, from the Hub cache
        assert_exact(dense, setup)
        assert_exact(pack, setup)
        downloads = {r.split(" ")[1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r}
        assert {"/me/base/resolve/dev/model.safetensors", f"/me/base-signs/resolve/main/{SIGN_PACK_NAME}"} <= downloads
        assert not any(path.startswith("/me/base-signs/") and "model" in path for path in downloads)  # the pack alone
        with pytest.raises(BaseModelNotFoundError, match="neither a sign pack.*nor safetensors"):
            export(setup["tuned"], tmp_path / "x", sign_source="base", base_model="me/base")  # main holds nothing
        with pytest.raises(BaseModelNotFoundError, match="no revision 'nope'.*base_revision"):
            export(setup["tuned"], tmp_path / "x", sign_source="base", base_model="me/base", base_revision="nope")
        with pytest.raises(BaseModelNotFoundError, match="Hub has no such repo"):
            export(setup["tuned"], tmp_path / "x", sign_source="base", base_model="me/gone")
    quantization = json.loads((dense / "config.json").read_text())["quantization_config"]
    assert (quantization["base_model"], quantization["base_revision"]) == ("me/base", "dev")
    assert quantization["base_signs_checksum"] == json.loads(
        (pack / "config.json").read_text())["quantization_config"]["base_signs_checksum"]


def test_a_base_found_elsewhere_at_load_time(setup, tmp_path):
    root = setup["root"]
    shutil.copytree(root / "base", tmp_path / "moved")
    folder = export(setup["tuned"], tmp_path / "export", sign_source="base", base_model=str(tmp_path / "moved"))
    shutil.rmtree(tmp_path / "moved")
    clear_base_signs_cache()
    with pytest.raises(BaseModelNotFoundError, match=r"moved.*outside the checkpoint's folder.*SignLockConfig\(base_model="):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(BaseModelNotFoundError, match=r"moved.*not an existing folder.*SignLockConfig\(base_model="):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=SignLockConfig(base_model=str(
            tmp_path / "moved")))
    assert_exact(folder, setup, quantization_config=SignLockConfig(base_model=str(root / "pack")))


def test_a_base_of_another_architecture_or_with_other_signs_is_refused(setup, tmp_path):
    root = setup["root"]
    folder = export(setup["tuned"], tmp_path / "export", sign_source="base", base_model=str(root / "pack"))
    base_model(hidden=64).save_pretrained(tmp_path / "wider")
    fine_tune(setup["base"], flip_share=0.01, seed=7).save_pretrained(tmp_path / "other-signs")
    (tmp_path / "empty").mkdir()
    wider = r"stores 'model.layers.0.self_attn.q_proj.weight' with shape \(64, 64\), the checkpoint needs \(32, 32\)"
    refusals = {"wider": (BaseArchitectureError, wider + ".*base_model"),
                "other-signs": (BaseSignsMismatchError, "do not match the checksum.*exact model the fine-tune"),
                "empty": (BaseModelNotFoundError, "neither a sign pack .* nor safetensors weights.*hf-signlock signs")}
    for base, (error, message) in refusals.items():
        with pytest.raises(error, match=message):
            AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=SignLockConfig(base_model=str(tmp_path / base)))
        with pytest.raises(error):  # the same base refused at export
            export(setup["tuned"], tmp_path / "x", sign_source="base", base_model=str(tmp_path / base),
                   base_signs_checksum=json.loads((folder / "config.json").read_text())[
                       "quantization_config"]["base_signs_checksum"])
    assert issubclass(BaseSignsMismatchError, BaseModelError)
    with pytest.raises(SignLockConfigError, match="sign_source='base'.*pass `base_model`"):
        SignLockConfig(sign_source="base")
    with pytest.raises(BaseModelError, match="is a SignLock checkpoint.*hf-signlock signs"):
        export(setup["tuned"], tmp_path / "x", sign_source="base", base_model=str(root / "packed"))


def test_export_run_of_a_fine_tune_stores_its_signs_against_its_base(setup, tmp_path, capsys):
    root, run = setup["root"], tmp_path / "run"
    setup["tuned"].save_pretrained(run)
    names = [f"{name}.weight" for name in find_target_modules(setup["tuned"])]
    (run / STATS_NAME).write_text(json.dumps({"reference_mode": "captured", "model_name_or_path": str(root / "base"),
                                              "seed": 42, "target_modules": names}))
    report = export_run(run, tmp_path / "out", codec="exact", dtype="float32")  # the exact round trip
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (report["sign_source"], quantization["base_model"], quantization["target_modules"]) == (
        "base", str(root / "base"), None)
    assert_exact(tmp_path / "out", setup, quantization_config=SignLockConfig(base_model=str(root / "base")))
    assert main(["export", str(run), str(tmp_path / "cli"), "--codec", "exact", "--base-model", str(root / "pack"),
                 "--dtype", "float32"]) == 0
    flips = sum(flips_of(setup["tuned"], setup["base"]).values())
    assert f"{flips:,} flips" in capsys.readouterr().out
    quantization = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert (quantization["sign_source"], quantization["base_model"]) == ("base", str(root / "pack"))
    (run / STATS_NAME).write_text(json.dumps({"reference_mode": "captured", "target_modules": names}))
    assert export_run(run, tmp_path / "unrecorded", codec="exact")["sign_source"] == "packed"  # no base known


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (64, 24), (1, 1)])
def test_weight_sign_bits_packs_as_pack_signs(dtype, shape):
    """A base's signs read from its weights are ``pack_signs`` of sign(w) with 0 and -0 counted +1, NaN -1 (as export
    counts them), the padding bits 0."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    specials = torch.tensor([0.0, -0.0, float("nan")], dtype=dtype)[: weight.numel()]
    weight.view(-1)[: len(specials)] = specials
    expected = torch.zeros((weight.numel() + 7) // 8, dtype=torch.uint8)  # bit k of byte j: position 8j + k
    for position, value in enumerate(weight.reshape(-1).float().tolist()):
        expected[position // 8] |= int(value >= 0) << (position % 8)
    assert torch.equal(pack_signs(torch.where(weight >= 0, 1, -1).to(torch.int8)), expected)
    bits = weight_sign_bits(weight)
    assert bits.dtype == torch.uint8 and torch.equal(bits, expected)
    assert bits[0].item() & 0b11 == 0b11 or weight.numel() < 2  # 0 and -0 are +1


def test_eval_of_an_export_stored_against_a_local_base_takes_the_base_on_the_command_line(setup, tmp_path, capsys):
    """The export names its base by an absolute path: eval follows it only when the user names it (--base_model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = setup["root"]
    folder = export(setup["tuned"], tmp_path / "export", sign_source="base", base_model=str(root / "base"))
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    args = ["eval", str(folder), "--dataset", str(text), "--window", "16", "--max_tokens", "100"]
    assert main(args) == 2
    assert "outside the checkpoint's folder" in capsys.readouterr().err
    assert main([*args, "--base_model", str(root / "pack")]) == 0
    assert "perplexity" in capsys.readouterr().out
