"""Bits per weight vs perplexity of SignLock exports of the quickstart model, with their baselines, in one run.

For each codec and total budget (1.0, 0.5, 0.25, 0.1 bits per target weight): the seed-sign export, refined for
``--refine-steps`` steps on the training text with signs fixed. Beside each: what the same magnitudes cost with
``packed`` signs (1 bit each) and with seed signs of the baseline recipe's model (no regulariser, more flips), and
signed vector quantisation (codebooks over signed weights, as AQLM/VPTQ do) at the same total bits and the same
refinement. The dense reference is given the same number of extra training steps, and both its perplexities are
reported. Budgets a per-layer codec cannot reach on these small layers are listed as such.

    python bench/compare_codecs.py [--refine-steps 200]   # needs runs/quickstart and runs/baseline (make quickstart baseline)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signlock import SignLockConfig, SignLockConfigError, quantize_model
from hf_signlock.data import build_lm_datasets, load_raw_datasets
from hf_signlock.evaluation.perplexity import perplexity
from hf_signlock.quantization.bits import checkpoint_report
from hf_signlock.quantization.codecs import VectorCodec
from hf_signlock.quantization.export import signs_of_run
from hf_signlock.quantization.format.flip_coding import encode_flips
from hf_signlock.quantization.linear import SignLockLinear, link_shared_tables
from hf_signlock.quantization.quantize import flip_positions, layer_overhead_bits, model_bytes
from hf_signlock.quantization.refine import refine, train_steps
from hf_signlock.signs import reference_signs
from hf_signlock.targets import find_target_modules
from hf_signlock.training.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (1.0, 0.5, 0.25, 0.1)
CODECS = ("vq", "lowrank", "scale")


class SignedVectorCodec(VectorCodec):
    """The baseline's codec: vq's machinery (row scales, k-means codebooks, shared when per-layer ones do not
    fit) over the signed weights, as AQLM/VPTQ quantise them, so both sides get the same table formats."""

    floor = None


class SignedVQLinear(nn.Module):
    """A layer of signed vq: its tables trainable (fp32) for the same refinement the seed-sign exports get."""

    def __init__(self, name: str, linear: nn.Linear, codec: SignedVectorCodec, stored: dict, params: dict,
                 overhead_bits: float):
        super().__init__()
        self.param_name, self.shape, self.bias = name, tuple(linear.weight.shape), linear.bias
        self.codec, self.codec_params = codec, params
        self.tables = nn.ParameterDict({name: nn.Parameter(t.float()) for name, t in stored.items()
                                        if t.is_floating_point()})
        for name, tensor in stored.items():
            if not tensor.is_floating_point():
                self.register_buffer(name, tensor)
        self._table_owner = ()  # (layer,) holding the shared codebook, set by link_shared_tables
        self.bits = sum(t.numel() * t.element_size() * 8 for t in stored.values()) + overhead_bits

    def forward(self, x):
        stored = {**dict(self.tables), **dict(self.named_buffers())}
        if self._table_owner:
            stored["codebook"] = self._table_owner[0].tables["codebook"]
        return nn.functional.linear(x, self.codec.decode(stored, self.shape, self.codec_params), self.bias)


def signed_vq(model, budget: float):
    """Replace the targets by signed vq at ``budget`` total bits per weight (no sign bits to pay); returns bpw."""
    codec = SignedVectorCodec()
    targets = find_target_modules(model, None)
    modules = {f"{name}.weight": module for name, module in targets.items()}
    # The same per-layer overhead (header entries, record, shared config) as a SignLock export, without flips.
    overhead = layer_overhead_bits(targets, SignLockConfig(seed=0, codec="vq", bits_per_weight=budget),
                                   dict.fromkeys(modules, 0), model_bytes(model))
    plan = codec.plan({name: (tuple(m.weight.shape), budget * m.weight.numel() - overhead[name])
                       for name, m in modules.items()})
    encoded = codec.encode_all({name: (lambda m=m: m.weight.detach().float()) for name, m in modules.items()}, plan)
    layers = {name: SignedVQLinear(name, m, codec, encoded[name], plan[name], overhead[name])
              for name, m in modules.items()}
    link_shared_tables(layers.values())
    for name, layer in layers.items():
        model.set_submodule(name.removesuffix(".weight"), layer)
    return sum(layer.bits for layer in layers.values()) / sum(m.weight.numel() for m in modules.values()), tables_of(plan.values())


def tables_of(params) -> str:
    """How the vq tables were stored: codebooks per layer or shared, and the row-scale forms used."""
    params = list(params)
    if not params or "bits" not in params[0]:
        return ""
    shared = "shared codebook" if params[0].get("shared") else "codebook per layer"
    scales = sorted({p.get("row_scales", "bf16") for p in params})
    return f"{shared}; row scales {'/'.join(scales)}; bits {sorted({p['bits'] for p in params})}"


def flip_bits_of(run_dir: Path, model) -> int:
    """Bits of the coded flips of ``model``'s targets against the seeded signs of ``run_dir``."""
    signs = signs_of_run(run_dir)
    bits = 0
    for name, module in find_target_modules(model, None).items():
        weight = module.weight.detach()
        reference = reference_signs(signs["seed"], f"{name}.weight", weight.shape, signs["sign_source"])
        flips = flip_positions(torch.where(weight >= 0, 1, -1).to(torch.int8), reference)
        bits += 8 * len(encode_flips(flips, weight.numel()))
    return bits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--baseline-run", default=str(ROOT / "runs" / "baseline"))
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--refine-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    run, baseline_run = Path(args.run), Path(args.baseline_run)
    data_args = parse_recipe(args.recipe, [])[1]
    tokenizer = AutoTokenizer.from_pretrained(run)
    lm = build_lm_datasets(load_raw_datasets(data_args), tokenizer, data_args)
    train, held_out = lm["train"], lm["validation"]

    def fresh():
        return AutoModelForCausalLM.from_pretrained(run).eval()

    started = time.perf_counter()
    dense = fresh()
    numel = sum(m.weight.numel() for m in find_target_modules(dense, None).values())
    dense_ppl = perplexity(dense, held_out)["perplexity"]
    train_steps(dense, [p for p in dense.parameters()], train, args.refine_steps, args.lr)
    dense_extra_ppl = perplexity(dense, held_out)["perplexity"]
    seed_flip_bits = flip_bits_of(run, fresh())
    baseline_flip_bits = flip_bits_of(baseline_run, AutoModelForCausalLM.from_pretrained(baseline_run))
    fair = min(dense_ppl, dense_extra_ppl)  # extra steps from a restarted optimizer can hurt: take the better one
    rows = []
    for codec in CODECS:
        for budget in (BUDGETS if codec != "scale" else (None,)):
            row = {"codec": codec, "budget": budget}
            try:
                model = fresh()
                signs = {**signs_of_run(run, model), "target_embeddings": False}  # the codecs on the projections
                model = quantize_model(model, SignLockConfig(**signs, codec=codec, bits_per_weight=budget))
            except SignLockConfigError as error:
                rows.append({**row, "unreachable": str(error)})
                print(codec, budget, "unreachable", flush=True)
                continue
            row["tables"] = tables_of(m.codec_params for m in model.modules() if isinstance(m, SignLockLinear))
            row["ppl_before_refine"] = perplexity(model, held_out)["perplexity"]
            refine(model, train, args.refine_steps, args.lr)
            row["ppl"] = perplexity(model, held_out)["perplexity"]
            with tempfile.TemporaryDirectory() as folder:  # bits counted from the files, as `hf-signlock inspect` does
                model.save_pretrained(folder)
                report = checkpoint_report(folder)
            row["bpw"] = report["bpw"]
            row["sign_bits_per_weight"] = report["total"]["sign_bits"] / numel
            # The same magnitudes with packed signs, and with the baseline recipe's flips:
            row["bpw_packed_signs"] = report["bpw"] + (numel - report["total"]["sign_bits"]) / numel
            row["bpw_baseline_recipe"] = report["bpw"] + (baseline_flip_bits - seed_flip_bits) / numel
            rows.append(row)
            print(row, flush=True)
    for budget in BUDGETS:
        row = {"codec": "signed vq (baseline)", "budget": budget}
        model = fresh()
        try:
            row["bpw"], row["tables"] = signed_vq(model, budget)
        except SignLockConfigError as error:
            rows.append({**row, "unreachable": str(error)})
            continue
        row["ppl_before_refine"] = perplexity(model, held_out)["perplexity"]
        params = [p for n, p in model.named_parameters() if ".tables." in n]
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        train_steps(model, params, train, args.refine_steps, args.lr)
        row["ppl"] = perplexity(model, held_out)["perplexity"]
        rows.append(row)
        print(row, flush=True)
    result = {"dense_ppl_fair": fair, "dense_ppl": dense_ppl, "dense_ppl_extra_steps": dense_extra_ppl, "refine_steps": args.refine_steps,
              "learning_rate": args.lr, "target_weights": numel, "seed_flip_bits": seed_flip_bits,
              "baseline_recipe_flip_bits": baseline_flip_bits, "rows": rows, "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codecs.json").write_text(json.dumps(result, indent=2))
    lines = [f"# SignLock exports of the quickstart model ({numel:,} target weights), {args.refine_steps} refinement "
             f"steps\n", f"Dense: perplexity {dense_ppl:.2f}; with the same {args.refine_steps} extra steps (the fair "
             f"reference): {dense_extra_ppl:.2f}; ratios use the better of the two, {fair:.2f}. Coded flips: {seed_flip_bits / numel:.4f} bits per weight "
             f"(quickstart), {baseline_flip_bits / numel:.4f} (baseline recipe, no regulariser).\n",
             "| codec | budget | bpw | ppl before refine | ppl | ppl / dense | bpw with packed signs | "
             "bpw with the baseline recipe's flips | vq tables |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "unreachable" in r:
            lines.append(f"| {r['codec']} | {r['budget']} | unreachable: {r['unreachable'][:90]} | | | | | | |")
            continue
        lines.append(f"| {r['codec']} | {r['budget']} | {r['bpw']:.3f} | {r['ppl_before_refine']:.2f} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / fair:.3f} | {r.get('bpw_packed_signs', float('nan')):.3f} | "
                     f"{r.get('bpw_baseline_recipe', float('nan')):.3f} | {r.get('tables', '')} |")
    (out / "codecs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
