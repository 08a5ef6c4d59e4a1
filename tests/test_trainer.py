"""SignLockTrainer: logging, stats file, drift scaling under gradient accumulation, resume, bad input."""

import json

import pytest
import torch
from datasets import Dataset
from reference_signs import plain_outward_drift
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

from hf_signlock import (
    NonFiniteLossError,
    SignLockConfigError,
    SignLockTrainer,
    SignLockTrainingArguments,
    TargetNotFoundError,
    apply_gap_init,
    seeded_signs,
)

VOCAB, LENGTH = 64, 16


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def dataset():
    generator = torch.Generator().manual_seed(0)
    # A learnable pattern (next token = previous + 1 mod V) with noise, so training moves the weights.
    start = torch.randint(0, VOCAB, (128, 1), generator=generator)
    ids = (start + torch.arange(LENGTH)) % VOCAB
    noise = torch.rand(ids.shape, generator=generator) < 0.1
    ids = torch.where(noise, torch.randint(0, VOCAB, ids.shape, generator=generator), ids)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def make_args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "run"), "max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
        "logging_steps": 4, "flip_tracking_steps": 2, "report_to": "none", "save_strategy": "no", "seed": 3,
        "dataloader_pin_memory": False, "disable_tqdm": True, "use_cpu": True,
    }
    values.update(overrides)
    return SignLockTrainingArguments(**values)


def test_tiny_run_logs_and_writes_stats(tmp_path, dataset):
    args = make_args(tmp_path, save_initial_model=True)
    trainer = SignLockTrainer(model=tiny_model(), args=args, train_dataset=dataset, eval_dataset=dataset.select(range(16)))
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert 0 <= entry["flip_rate"] < 0.5
        assert 0 <= entry["near_zero_fraction"] <= 1
        assert entry["drift_loss"] >= 0
    stats = json.loads((tmp_path / "run" / "signlock_stats.json").read_text())
    for key in ("flip_rate", "eval_perplexity", "crossing_histogram", "geometric_tail_ratio", "target_weights",
                "seed", "versions"):
        assert key in stats
    assert stats["seed"] == 3 and stats["target_weights"] == sum(stats["crossing_histogram"])
    # Seeded runs measure the margin in init stds (0.02 here), one per target.
    assert stats["drift_sigma"]["source"] == "init_std"
    assert list(stats["drift_sigma"]["per_target"].values()) == pytest.approx([0.02] * len(trainer.reference.targets))
    assert stats["eval_perplexity"] == pytest.approx(torch.tensor(stats["eval_loss"]).exp().item())
    assert stats["versions"]["torch"] == torch.__version__
    # The flip rate in the file is recomputed from the final weights against the regenerated signs.
    model = trainer.model
    flips = total = 0
    for target in trainer.reference.targets:
        w = target.param.detach()
        s0 = seeded_signs(3, target.name, w.numel()).view(w.shape)
        flips += int((s0 * w <= 0).sum())
        total += w.numel()
    assert stats["flips"] == flips and stats["flip_rate"] == flips / total
    # The step-0 model was written and agrees with the seeded signs everywhere.
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "initial")
    for name, w in initial.named_parameters():
        if name in {t.name for t in trainer.reference.targets}:
            assert torch.equal(torch.sign(w).to(torch.int8), seeded_signs(3, name, w.numel()).view(w.shape))
    assert model is trainer.model


class _GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _first_step_grads(tmp_path, dataset, drift_lambda, accumulation):
    args = make_args(
        tmp_path, max_steps=1, drift_lambda=drift_lambda, gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=8 // accumulation, max_grad_norm=0.0, output_dir=str(tmp_path / f"g{drift_lambda}"),
    )
    capture = _GradCapture()
    trainer = SignLockTrainer(model=tiny_model(), args=args, train_dataset=dataset, callbacks=[capture])
    trainer.train()
    return trainer, capture.grads


@pytest.mark.parametrize("accumulation", [1, 4])
def test_drift_gradient_is_lambda_grad_r(tmp_path, dataset, accumulation):
    lam, margin = 50.0, 1.0
    trainer, with_drift = _first_step_grads(tmp_path, dataset, lam, accumulation)
    _, without = _first_step_grads(tmp_path, dataset, 0.0, accumulation)
    # grad R from the defining formula, at the step-0 weights (identical in both runs: same seed, same init).
    model = tiny_model()
    targets = apply_gap_init(model, trainer.args.sign_seed, trainer.args.gap)
    params = [t.param for t in targets]
    total = sum(p.numel() for p in params)
    r = plain_outward_drift(targets, seed=3, margin=margin)
    grad_r = torch.autograd.grad(r, params)
    for target, g in zip(targets, grad_r):
        difference = with_drift[target.name] - without[target.name]
        # Equal up to the float rounding of adding the term into the task gradient (a wrong GA or world-size factor
        # would be off by 4x or 2x).
        torch.testing.assert_close(difference, lam * g, rtol=1e-4, atol=1e-6 * lam / total)
    for name, g in without.items():
        if name not in {t.name for t in targets}:
            torch.testing.assert_close(with_drift[name], g, rtol=0, atol=0)


def test_resume_continues_tracking_exactly(tmp_path, dataset):
    common = {"max_steps": 12, "save_strategy": "steps", "save_steps": 6, "flip_tracking_steps": 4,
              "learning_rate": 3e-2}
    straight = SignLockTrainer(model=tiny_model(), args=make_args(tmp_path, output_dir=str(tmp_path / "a"), **common),
                               train_dataset=dataset)
    straight.train()
    resumed = SignLockTrainer(model=tiny_model(1), args=make_args(tmp_path, output_dir=str(tmp_path / "a"), **common),
                              train_dataset=dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert straight.tracker.crossing_histogram() == resumed.tracker.crossing_histogram()
    assert straight.tracker.last == resumed.tracker.last
    for name, counts in straight.tracker.crossings.items():
        assert torch.equal(counts, resumed.tracker.crossings[name])
    assert sum(straight.tracker.crossing_histogram()[1:]) > 0  # the test means something only if weights crossed


def test_captured_reference_for_fine_tuning(tmp_path, dataset):
    model = tiny_model()
    before = {n: torch.sign(p.detach()).clone() for n, p in model.named_parameters()}
    args = make_args(tmp_path, reference_mode="captured", max_steps=4)
    trainer = SignLockTrainer(model=model, args=args, train_dataset=dataset)
    assert trainer.tracker.observe(0)["flip_rate"] == 0.0
    for target in trainer.reference.targets:  # the pretrained weights were not re-initialised
        assert torch.equal(torch.sign(target.param.detach()), before[target.name])
    start_rms = {t.name: t.param.detach().double().pow(2).mean().sqrt().item() for t in trainer.reference.targets}
    trainer.train()
    stats = json.loads((tmp_path / "run" / "signlock_stats.json").read_text())
    assert stats["reference_mode"] == "captured"
    # sigma_l, the unit of the margin, is each layer's starting RMS, recorded per target.
    assert stats["drift_sigma"]["source"] == "start_rms"
    assert stats["drift_sigma"]["per_target"] == pytest.approx(start_rms, rel=1e-12)
    assert 0 < stats["margin_share_at_start"] < 1


def test_captured_resume_keeps_the_starting_sigma(tmp_path, dataset):
    common = {"reference_mode": "captured", "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    first = SignLockTrainer(model=tiny_model(), args=make_args(tmp_path, **common), train_dataset=dataset)
    first.train()
    other = tiny_model(1)
    with torch.no_grad():  # a model with another scale: its own RMS must not replace the checkpoint's
        for p in other.parameters():
            p.mul_(3)
    resumed = SignLockTrainer(model=other, args=make_args(tmp_path, output_dir=str(tmp_path / "b"), **common),
                              train_dataset=dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.reference.scales == pytest.approx(first.reference.scales, rel=1e-12)


def test_nan_loss_stops_with_clear_error(tmp_path, dataset):
    model = tiny_model()
    trainer = SignLockTrainer(model=model, args=make_args(tmp_path), train_dataset=dataset)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="learning_rate"):
        trainer.train()


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"gap": -0.5}, SignLockConfigError, "gap"),
        ({"sign_seed": 1.5}, SignLockConfigError, "sign_seed"),
        ({"drift_lambda": float("nan")}, SignLockConfigError, "drift_lambda"),
        ({"flip_tracking_steps": 0}, SignLockConfigError, "flip_tracking_steps"),
        ({"reference_mode": "pretrained"}, SignLockConfigError, "reference_mode"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, overrides, error, field):
    with pytest.raises(error, match=field):
        make_args(tmp_path, **overrides)


def test_unknown_target_pattern(tmp_path, dataset):
    with pytest.raises(TargetNotFoundError, match="q_proj"):
        SignLockTrainer(model=tiny_model(), args=make_args(tmp_path, target_modules=["qkv_proj"]), train_dataset=dataset)


def _target_signs(model) -> dict[str, torch.Tensor]:
    return {name: torch.sign(param.detach()).clone() for name, param in model.named_parameters() if "proj" in name}


def _follow_seed(model, seed: int) -> bool:
    return all(torch.equal(sign, seeded_signs(seed, name, sign.numel()).view(sign.shape).float())
               for name, sign in _target_signs(model).items())


def test_a_pretrained_model_is_never_reinitialised_unless_asked(tmp_path, dataset):
    tiny_model().save_pretrained(tmp_path / "pretrained")
    pretrained = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained")
    before = _target_signs(pretrained)
    with pytest.raises(SignLockConfigError, match=r"loaded from .*pretrained.*reference_mode='captured'.*"
                                                  r"init_weights=True"):
        SignLockTrainer(model=pretrained, args=make_args(tmp_path), train_dataset=dataset)
    assert all(torch.equal(before[n], s) for n, s in _target_signs(pretrained).items())  # untouched
    SignLockTrainer(model=pretrained, args=make_args(tmp_path, init_weights=True), train_dataset=dataset)
    assert _follow_seed(pretrained, 3)  # asked explicitly: re-initialised with sign_seed (= seed 3)


def test_a_fresh_model_is_initialised_and_a_seeded_one_is_kept(tmp_path, dataset):
    fresh = tiny_model()
    SignLockTrainer(model=fresh, args=make_args(tmp_path), train_dataset=dataset)
    assert _follow_seed(fresh, 3)
    with torch.no_grad():  # a seeded model that then trained a little, saved and reloaded: continued, not reset
        for name, param in fresh.named_parameters():
            if "proj" in name:
                param.mul_(1.5)
    fresh.save_pretrained(tmp_path / "seeded")
    seeded = AutoModelForCausalLM.from_pretrained(tmp_path / "seeded")
    weights = {n: p.detach().clone() for n, p in seeded.named_parameters()}
    SignLockTrainer(model=seeded, args=make_args(tmp_path), train_dataset=dataset)
    assert all(torch.equal(weights[n], p) for n, p in seeded.named_parameters())


def test_keeping_weights_that_do_not_follow_the_seed_warns_with_the_fix(tmp_path, dataset, caplog):
    trainer = SignLockTrainer(model=tiny_model(), args=make_args(tmp_path, init_weights=False, max_steps=1),
                              train_dataset=dataset)
    trainer.train()
    assert "not initialised from `sign_seed`: use init_weights=True" in caplog.text
