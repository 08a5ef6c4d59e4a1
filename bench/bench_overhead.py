"""Step-time overhead of sign lock-in: SignLockTrainer vs a plain Trainer on the same model, data and steps.

Four variants, interleaved round-robin so that machine drift hits all of them alike:
  plain      transformers.Trainer
  tracking   SignLockTrainer, drift off (lambda 0), flips observed every `flip_tracking_steps` (default 10)
  drift      SignLockTrainer, drift on, tracking effectively off (interval > steps)
  signlock   SignLockTrainer as the quickstart runs it: drift on + tracking at the default interval
Each run's time is the Trainer's own `train_runtime` for `--steps` optimizer steps (the loop, callbacks included).
Whole-step timings on a shared 2-core machine scatter by several percent, so the script also times the two added
pieces in isolation (drift loss forward + backward; one flip-tracking observation) and reports their cost per step
relative to the plain step: the estimate the noise cannot hide.
The model is the quickstart's (Llama, 4 x 128, vocab 4096, block 128, batch 16) on random tokens.

    python bench/bench_overhead.py            # writes bench/results/overhead.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from timing import median_seconds
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments, default_data_collator
from transformers.utils import logging

from hf_signlock import SignLockTrainer, SignLockTrainingArguments

VOCAB, BLOCK, BATCH = 4096, 128, 16


def model_factory():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352, vocab_size=VOCAB,
        max_position_embeddings=BLOCK, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config)


def run(variant: str, steps: int, dataset: Dataset, output_dir: str) -> float:
    common = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=2e-3,
        logging_steps=25, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False,
        seed=0, use_cpu=True,
    )
    if variant == "plain":
        trainer = Trainer(model=model_factory(), args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=default_data_collator)
    else:
        extra = {
            "tracking": dict(drift_lambda=0.0),
            "drift": dict(flip_tracking_steps=10 * steps),
            "signlock": {},
        }[variant]
        args = SignLockTrainingArguments(**common, **extra)
        trainer = SignLockTrainer(model=model_factory(), args=args, train_dataset=dataset,
                                  data_collator=default_data_collator)
    # Time the optimisation loop only: SignLockTrainer's end-of-run stats (an eval) are not a per-step cost.
    if isinstance(trainer, SignLockTrainer):
        trainer.write_stats = lambda *a, **k: {}
    return trainer.train().metrics["train_runtime"] / steps


def component_costs(repeats: int = 30) -> dict:
    """Median ms of the drift term (forward + backward) and of one flip-tracking observation, in isolation."""
    from hf_signlock import FlipTracker, SignReference, apply_gap_init, outward_drift

    model = model_factory()
    targets = apply_gap_init(model, seed=0, gap=1.0)
    reference = SignReference.from_seed(targets, seed=0)
    tracker = FlipTracker(reference)
    tracker.observe(0)

    def drift_step():
        outward_drift(reference, 1.0).backward()

    def median_ms(fn):
        return 1000 * median_seconds(fn, repeats)

    return {"drift_forward_backward_ms": median_ms(drift_step), "tracking_observe_ms": median_ms(lambda: tracker.observe(1))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    logging.set_verbosity_error()

    ids = torch.randint(0, VOCAB, (args.steps * BATCH, BLOCK), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    variants = ["plain", "tracking", "drift", "signlock"]
    times = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        run("plain", 5, dataset, tmp)  # warm-up: imports, allocator, thread pools
        for round_index in range(args.rounds):
            order = variants[round_index % 4:] + variants[: round_index % 4]
            for variant in order:
                times[variant].append(run(variant, args.steps, dataset, tmp))

    plain = statistics.median(times["plain"])
    components = component_costs()
    interval = SignLockTrainingArguments(output_dir="x").flip_tracking_steps
    added_ms = components["drift_forward_backward_ms"] + components["tracking_observe_ms"] / interval
    components.update(flip_tracking_steps=interval, added_ms_per_step=added_ms,
                      added_fraction_of_plain_step=added_ms / (1000 * plain))
    results = {
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "steps_per_run": args.steps, "rounds": args.rounds, "batch": [BATCH, BLOCK], "components": components,
        "variants": {
            v: {"median_step_s": statistics.median(t), "step_s": t,
                "ratio_to_plain": statistics.median(t) / plain}
            for v, t in times.items()
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(results, indent=2))
    lines = ["| variant | median step (ms) | ratio to plain Trainer |", "|---|---:|---:|"]
    for v, r in results["variants"].items():
        lines.append(f"| {v} | {1000 * r['median_step_s']:.1f} | {r['ratio_to_plain']:.3f} |")
    table = "\n".join(lines) + (
        f"\n\nIn isolation: drift forward + backward {components['drift_forward_backward_ms']:.2f} ms per step, one "
        f"tracking observation {components['tracking_observe_ms']:.2f} ms every {interval} steps: "
        f"{components['added_ms_per_step']:.2f} ms = {100 * components['added_fraction_of_plain_step']:.2f}% of the "
        "plain step."
    )
    (out / "overhead.md").write_text(
        f"# Step-time overhead ({args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads)\n\n"
        f"{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
