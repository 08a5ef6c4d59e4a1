"""Sign generation speed: regenerate a weight's seeded signs vs copy the weight in bf16, in one run.

For each shape, median times of: `seeded_sign_bits` (the signs regenerated as packed bits, the form a stored sign
matrix has), `seeded_signs` (expanded to int8 -1/+1), `clone()` and `copy_()` into a preallocated buffer of the same
tensor in bf16, and unpacking 1-bit stored signs to int8 (what explicit signs cost to decode).

    python bench/bench_signs.py [--quick] [--device cuda]   # writes bench/results/signs.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from timing import median_seconds

from hf_signlock import pack_signs, seeded_sign_bits, seeded_signs, unpack_signs

SHAPES = [(128, 128), (576, 1536), (1024, 1024), (2048, 5632), (4096, 4096)]


def timed(fn, device: torch.device, repeats: int) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return median_seconds(fn, repeats, warmup=2, sync=sync)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(shape, device: torch.device) -> dict:
    numel = shape[0] * shape[1]
    repeats = max(20, min(500, 100_000_000 // numel))
    weight = torch.randn(shape, device=device).to(torch.bfloat16)
    buffer = torch.empty_like(weight)
    packed = pack_signs(seeded_signs(0, "w", numel, device=device))
    name = "model.layers.0.mlp.up_proj.weight"
    regenerate = timed(lambda: seeded_signs(0, name, numel, device=device), device, repeats)
    bits = timed(lambda: seeded_sign_bits(0, name, numel, device=device), device, repeats)
    clone = timed(lambda: weight.clone(), device, repeats)
    copy = timed(lambda: buffer.copy_(weight), device, repeats)
    unpack = timed(lambda: unpack_signs(packed, shape), device, repeats)
    return {
        "shape": list(shape), "numel": numel, "repeats": repeats,
        "regenerate_s": regenerate, "regenerate_bits_s": bits, "bf16_clone_s": clone, "bf16_copy_s": copy, "unpack_1bit_s": unpack,
        "signs_per_s": numel / regenerate,
        "ratio_to_bf16_clone": regenerate / clone, "ratio_to_bf16_copy": regenerate / copy,
        "ratio_to_unpack_1bit": regenerate / unpack,
        "bits_ratio_to_bf16_copy": bits / copy, "bits_ratio_to_bf16_clone": bits / clone,
    }


def quickstart_shapes() -> list[tuple[str, tuple[int, int]]]:
    """The 28 target weights of recipes/quickstart.yaml (Llama, 4 layers, hidden 128, MLP 352, 4 KV heads of 32)."""
    shapes = {"q_proj": (128, 128), "k_proj": (128, 128), "v_proj": (128, 128), "o_proj": (128, 128),
              "gate_proj": (352, 128), "up_proj": (352, 128), "down_proj": (128, 352)}
    return [(f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}"
             f".{n}.weight", shape) for i in range(4) for n, shape in shapes.items()]


def measure_model(device: torch.device) -> dict:
    """Every target of a small model, one tensor at a time on both sides: what loading it costs."""
    named = quickstart_shapes()
    weights = [torch.randn(shape, device=device).to(torch.bfloat16) for _, shape in named]
    buffers = [torch.empty_like(w) for w in weights]

    def regenerate():
        for name, shape in named:
            seeded_signs(0, name, shape[0] * shape[1], device=device)

    def copy():
        for buffer, weight in zip(buffers, weights):
            buffer.copy_(weight)

    regenerate_s, copy_s = timed(regenerate, device, 50), timed(copy, device, 50)
    return {"tensors": len(named), "numel": sum(w.numel() for w in weights), "regenerate_s": regenerate_s,
            "bf16_copy_s": copy_s, "ratio_to_bf16_copy": regenerate_s / copy_s}


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    numel = [r["numel"] for r in results]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key, label in [("regenerate_bits_s", "regenerate seeded signs (packed bits)"),
                       ("regenerate_s", "regenerate seeded signs (int8)"), ("bf16_clone_s", "bf16 clone"),
                       ("bf16_copy_s", "bf16 copy_ into buffer"), ("unpack_1bit_s", "unpack 1-bit stored signs")]:
        axis.plot(numel, [1e3 * r[key] for r in results], marker="o", label=label)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("weights in the tensor")
    axis.set_ylabel("median time (ms)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the three smallest shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = SHAPES[:3] if args.quick else SHAPES
    results = [measure(shape, device) for shape in shapes]
    model = measure_model(device)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    (out / f"signs{suffix}.json").write_text(json.dumps({"machine": machine, "results": results, "quickstart_model": model}, indent=2))
    rows = ["| shape | weights | bf16 copy_ (ms) | bf16 clone (ms) | bits (ms) | bits / copy_ | bits / clone "
            "| int8 (ms) | int8 / copy_ | int8 / clone | int8 Gsigns/s | unpack 1-bit to int8 (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['numel']:,} | {1e3 * r['bf16_copy_s']:.3f} | "
            f"{1e3 * r['bf16_clone_s']:.3f} | {1e3 * r['regenerate_bits_s']:.3f} | {r['bits_ratio_to_bf16_copy']:.2f} | "
            f"{r['bits_ratio_to_bf16_clone']:.2f} | {1e3 * r['regenerate_s']:.3f} | {r['ratio_to_bf16_copy']:.2f} | "
            f"{r['ratio_to_bf16_clone']:.2f} | {r['signs_per_s'] / 1e9:.2f} | {1e3 * r['unpack_1bit_s']:.3f} |"
        )
    text = f"# Seeded sign generation vs bf16 copy ({machine['device']}, {machine['cpu']}, {machine['threads']} threads)\n\n"
    text += "\n".join(rows) + "\n"
    text += (f"\nWhole quickstart model, {model['tensors']} target tensors ({model['numel']:,} weights), one call per "
             f"tensor on both sides: regenerate int8 signs {1e3 * model['regenerate_s']:.3f} ms, bf16 copy_ "
             f"{1e3 * model['bf16_copy_s']:.3f} ms, ratio {model['ratio_to_bf16_copy']:.2f} (per-call overhead "
             "bound at this size).\n")
    (out / f"signs{suffix}.md").write_text(text)
    plot(results, out / f"signs{suffix}.png")
    print(text)


if __name__ == "__main__":
    main()
