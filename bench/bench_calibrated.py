"""Calibrated magnitude coding with the signs held, vs round-to-nearest and GPTQ, at equal total bits (prototype).

SmolLM2-135M (``tests/real_model.py``), the 210 q/k/v/o/gate/up/down projections. Same calibration data for every
method: ``--calib-seqs`` x ``--calib-len`` tokens drawn (seeded) from every built-in Shakespeare play except the
held-out one; held-out text: the last ``--tokens`` tokens of ``winters_tale`` (never in the calibration text),
scored with ``sliding_window_perplexity(window=256, stride=128)``.

Hessians: ``H = 2 X^T X`` of each projection's input, collected ONCE from the dense model (not sequentially from
the quantised prefix: a prototype simplification, the same for every calibrated method). q/k/v share one H, gate/up
share one.

Methods (bits counted per target weight, scale/zero tables in fp16):
  rtn       asymmetric min/max per group of g along the input dim, b bits:            b + 32/g
  gptq      the same grid, GPTQ (damp 1% mean diag, Cholesky of H^-1, blocks of 128, group params fitted on the
            error-updated weights when a group starts), signs free:                      b + 32/g
  ours      sign-constrained GPTQ: sign s = sign(W_dense) (packed, 1 bit), magnitude on a per-group fp16 scale x K
            levels (m = log2 K bits); q_i = s_i * scale * L[Q(max(s_i * w_i, 0) / scale)]; GPTQ error feedback:
                                                                                        1 + m + 16/g (+ tables)
            variants: levels uniform with a zero level ("u0"), uniform mid-rise without zero ("mid": every weight
            keeps a non-zero magnitude), Lloyd-Max levels per tensor fitted on the normalised magnitudes ("lm",
            K fp16 per tensor), optional per-group scale search over clipping factors ("+clip").

    python bench/bench_calibrated.py [--methods ...] [--layers N]   # writes results/calibrated.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from hf_signlock.data import default_corpus_files
from hf_signlock.evaluation.perplexity import sliding_window_perplexity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from real_model import smollm2_folder  # noqa: E402

HELD_OUT = "winters_tale"
SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # same input, same Hessian


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------- data
def texts(tokenizer, calib_seqs: int, calib_len: int, eval_tokens: int, seed: int = 0):
    files = default_corpus_files()
    held = [f for f in files if f.name.startswith(HELD_OUT)]
    assert len(held) == 1, held
    eval_ids = tokenizer(held[0].read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][-eval_tokens:]
    calib_text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f not in held)
    ids = torch.tensor(tokenizer(calib_text, add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - calib_len, (calib_seqs,), generator=g)
    calib = torch.stack([ids[s : s + calib_len] for s in starts.tolist()])
    return calib, torch.tensor(eval_ids)


# ----------------------------------------------------------------------------------------------------- hessians
@torch.no_grad()
def collect_hessians(model, calib: torch.Tensor, names: list[str], batch: int = 8) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    owners = sorted({SHARED.get(n.rsplit(".", 1)[1], n.rsplit(".", 1)[1]) and n for n in names})
    own = [n for n in names if n.rsplit(".", 1)[1] not in SHARED]
    hess = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in own}
    count = {"n": 0}
    hooks = []

    def hook(name):
        def fn(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hess[name].add_(x.T @ x)
        return fn

    for n in own:
        hooks.append(modules[n].register_forward_hook(hook(n)))
    body = model.model  # no lm_head: only the projections' inputs are needed
    for i in tqdm(range(0, len(calib), batch), desc="hessians", unit="batch"):
        body(input_ids=calib[i : i + batch])
        count["n"] += calib[i : i + batch].numel()
    for h in hooks:
        h.remove()
    del owners
    out = {}
    for n in names:
        prefix, suffix = n.rsplit(".", 1)
        src = n if suffix not in SHARED else f"{prefix}.{SHARED[suffix]}"
        out[n] = hess[src]
    return {n: (2.0 / count["n"]) * h for n, h in out.items()}  # scale is irrelevant to GPTQ; mean keeps it tame


# ----------------------------------------------------------------------------------------------------- quantisers
class AsymGrid:
    """Asymmetric min/max grid (GPTQ's quantizer: the range always holds 0), b bits, per group; scale+zero fp16."""

    def __init__(self, bits: int, clip: bool = False):
        self.maxq = 2**bits - 1
        self.clip_grid = tuple(1.0 - 0.05 * i for i in range(8)) if clip else (1.0,)

    def fit(self, w: torch.Tensor):  # w: [rows, g]
        best = None
        for c in self.clip_grid:  # optional MSE search over a shrunk range (GPTQ's own option, off by default)
            xmin = w.min(dim=1).values.clamp(max=0) * c
            xmax = w.max(dim=1).values.clamp(min=0) * c
            same = xmin == xmax
            xmin[same], xmax[same] = -1e-8, 1e-8
            scale = ((xmax - xmin) / self.maxq).half().float().clamp(min=1e-8)
            zero = torch.round(-xmin / scale)
            if len(self.clip_grid) == 1:
                return scale, zero
            err = (self.quant(w, (scale, zero)) - w).pow(2).sum(dim=1)
            if best is None:
                best = [scale, zero, err]
            else:
                better = err < best[2]
                best = [torch.where(better, a, b) for a, b in zip((scale, zero, err), best)]
        return best[0], best[1]

    def quant(self, w: torch.Tensor, params, s=None):  # w: [rows] or [rows, g]
        scale, zero = params
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        q = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return scale * (q - zero)


class SignMagGrid:
    """q = s * scale * L[nearest level to max(s*w, 0)/scale]; s fixed, scale per group (fp16), levels shared."""

    def __init__(self, levels: torch.Tensor, clip_grid=(1.0,), dual: bool = False):
        self.levels = levels.float().sort().values  # normalised to [0, 1]
        self.clip_grid = clip_grid
        self.dual = dual  # one scale per sign side of the group (the sign is known: asymmetry at no code cost)
        self.mid = (self.levels[1:] + self.levels[:-1]) / 2

    def _round(self, m: torch.Tensor) -> torch.Tensor:  # m >= 0, normalised
        return self.levels[torch.bucketize(m, self.mid)]

    def _fit_side(self, mag: torch.Tensor) -> torch.Tensor:  # mag: [rows, g] >= 0 (0 outside the side)
        peak = mag.max(dim=1).values.clamp(min=1e-8) / self.levels[-1]
        best, best_err = None, None
        for c in self.clip_grid:
            scale = (peak * c).half().float().clamp(min=1e-8)
            if len(self.clip_grid) == 1:
                return scale
            err = (self._round(mag / scale[:, None]) * scale[:, None] - mag).pow(2).sum(dim=1)
            if best is None:
                best, best_err = scale, err
            else:
                better = err < best_err
                best = torch.where(better, scale, best)
                best_err = torch.where(better, err, best_err)
        return best

    def fit(self, w: torch.Tensor, s: torch.Tensor):
        mag = (w * s).clamp(min=0)
        if not self.dual:
            return self._fit_side(mag)
        return self._fit_side(mag * (s > 0)), self._fit_side(mag * (s < 0))

    def quant(self, w: torch.Tensor, scale, s):
        if self.dual:
            sp, sn = scale
            if w.dim() == 2:
                sp, sn = sp[:, None], sn[:, None]
            scale = torch.where(s > 0, sp, sn)
        elif w.dim() == 2:
            scale = scale[:, None]
        mag = (w * s).clamp(min=0)
        return s * scale * self._round(mag / scale)


class FreeSign:
    """The same sign-magnitude grid with the sign free (taken from the error-updated weight): isolates what holding
    the stored signs costs. Not a packed-sign codec (its sign is part of the code)."""

    def __init__(self, inner: SignMagGrid):
        self.inner = inner

    def fit(self, w):
        return self.inner.fit(w, torch.where(w < 0, -1.0, 1.0))

    def quant(self, w, params):
        return self.inner.quant(w, params, torch.where(w < 0, -1.0, 1.0))


def lloyd_levels(mag: torch.Tensor, k: int, zero: bool, iters: int = 25) -> torch.Tensor:
    """Lloyd-Max levels on normalised magnitudes in [0, 1] (a sample); the top level fixed at 1 (the group peak
    maps to it exactly), and a level fixed at 0 when ``zero``."""
    x = mag.flatten()
    if x.numel() > 400_000:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:400_000]]
    lv = torch.linspace(0, 1, k) if zero else (torch.arange(k) + 0.5) / k
    lv[-1] = 1.0
    for _ in range(iters):
        mid = (lv[1:] + lv[:-1]) / 2
        idx = torch.bucketize(x, mid)
        for j in range(k):
            if (zero and j == 0) or j == k - 1:
                continue
            sel = x[idx == j]
            if sel.numel():
                lv[j] = sel.mean()
        lv = lv.sort().values
    return lv


# ----------------------------------------------------------------------------------------------------- methods
def rtn(W: torch.Tensor, grid: AsymGrid, g: int) -> torch.Tensor:
    out = torch.empty_like(W)
    for c in range(0, W.shape[1], g):  # the last group may be shorter (576 = 4 x 128 + 64)
        out[:, c : c + g] = grid.quant(W[:, c : c + g], grid.fit(W[:, c : c + g]))
    return out


def gptq(W: torch.Tensor, H: torch.Tensor, grid, g: int, signs: torch.Tensor | None = None,
         blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) with groups; with ``signs`` the grid is sign-constrained (quant/fit take s)."""
    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    extra = () if signs is None else (None,)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        S1 = None if signs is None else signs[:, i1:i2]
        params = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # group starts: fit on the error-updated weights of the group (inside this block)
                params = grid.fit(W1[:, i : i + g]) if signs is None else grid.fit(W1[:, i : i + g], S1[:, i : i + g])
            w = W1[:, i]
            q = grid.quant(w, params) if signs is None else grid.quant(w, params, S1[:, i])
            Q1[:, i] = q
            err = (w - q) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    del extra
    return Q


def signmag_rtn(W, grid: SignMagGrid, g: int, signs):
    rows, cols = W.shape
    out = torch.empty_like(W)
    for c in range(0, cols, g):
        w, s = W[:, c : c + g], signs[:, c : c + g]
        out[:, c : c + g] = grid.quant(w, grid.fit(w, s), s)
    return out


# method spec: name -> dict
def parse_method(spec: str) -> dict:
    """``rtn:b:g``, ``gptq:b:g``, ``ours:m:g:levels[:clip][:2s][:free][:rtn]`` (levels: u0 | mid | lm0 | lm;
    2s: a scale per sign side; free: signs not held, a reference only)."""
    parts = spec.split(":")
    kind = parts[0]
    if kind in ("rtn", "gptq"):
        b, g = int(parts[1]), int(parts[2])
        return {"spec": spec, "kind": kind, "bits": b, "g": g, "clip": "clip" in parts, "code_bits": b,
                "table_bits": 32}
    m, g, levels = int(parts[1]), int(parts[2]), parts[3]
    dual = "2s" in parts
    return {"spec": spec, "kind": "ours", "bits": m, "g": g, "levels": levels, "clip": "clip" in parts,
            "feedback": "rtn" not in parts, "free": "free" in parts, "dual": dual, "code_bits": 1 + m,
            "table_bits": 32 if dual else 16}


def quantise_layer(method: dict, W: torch.Tensor, H: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Quantised weight, and extra table bits of the tensor beyond the per-group ones (per-tensor levels)."""
    g = method["g"]
    if method["kind"] == "rtn":
        return rtn(W, AsymGrid(method["bits"], method["clip"]), g), 0
    if method["kind"] == "gptq":
        return gptq(W, H, AsymGrid(method["bits"], method["clip"]), g), 0
    k = 2 ** method["bits"]
    signs = torch.where(W < 0, -1.0, 1.0)
    lv = method["levels"]
    extra = 0
    if lv == "u0":
        levels = torch.linspace(0, 1, k)
    elif lv == "mid":
        levels = (torch.arange(k) + 0.5) / k
        levels = levels / levels[-1]
    else:  # Lloyd-Max on |w| / group peak, per tensor
        mag = W.abs()
        norm = torch.cat([mag[:, c : c + g] / mag[:, c : c + g].amax(dim=1, keepdim=True).clamp(min=1e-8)
                          for c in range(0, W.shape[1], g)], dim=1)
        levels = lloyd_levels(norm, k, zero=lv == "lm0")
        extra = 16 * k
    clip = tuple(1.0 - 0.05 * i for i in range(8)) if method["clip"] else (1.0,)
    grid = SignMagGrid(levels, clip, dual=method["dual"])
    if method["free"]:
        return gptq(W, H, FreeSign(grid), g), extra
    if not method["feedback"]:
        return signmag_rtn(W, grid, g, signs), extra
    return gptq(W, H, grid, g, signs=signs), extra


# ----------------------------------------------------------------------------------------------------- main
DEFAULT = ["rtn:3:128", "gptq:3:128", "gptq:3:128:clip", "ours:2:64:u0", "ours:2:64:mid", "ours:2:64:u0:clip",
           "ours:2:64:lm0:clip", "ours:2:64:lm0:clip:free",
           "rtn:4:128", "gptq:4:128", "gptq:4:128:clip", "ours:3:64:u0", "ours:3:64:lm0:clip"]
LEGEND = """Specs: `rtn:b:g` / `gptq:b:g[:clip]`: asymmetric min/max b-bit grid per group of g input columns, scale+zero
fp16 (576 = 4 x 128 + 64: the short last group's table is counted, hence 3.27/4.27); `clip`: per-group MSE search
over 8 range shrink factors 1.0..0.65. `ours:m:g:L[:clip][:free]`: sign held at sign(W_dense) (1 bit, packed) + m-bit
magnitude code on an fp16 per-group scale; L = `u0` uniform levels with a zero level {0, 1/(K-1), .., 1}, `mid`
uniform mid-rise with no zero level (every weight keeps a non-zero magnitude of its stored sign), `lm0` Lloyd-Max
levels per tensor on |w|/group peak with 0 and 1 fixed (K fp16 per tensor, counted); `free`: the same grid with the
sign taken from the error-updated weight (a control: what holding the signs costs, not a packed-sign codec).
GPTQ error feedback for all but rtn. Output rel err: sqrt(sum tr(D H D^T) / sum tr(W H W^T)) over the projections,
D = Q - W. Signs flipped: share of weights whose code has the opposite sign; zeroed: non-zero weights coded as 0."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT))
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=None, help="quantise only the first N decoder layers (timing)")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibrated"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    logging.disable_progress_bar()
    t0 = time.perf_counter()
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    calib, eval_ids = texts(tokenizer, args.calib_seqs, args.calib_len, args.tokens)
    log(f"calibration {tuple(calib.shape)} tokens from {len(default_corpus_files()) - 1} plays; "
        f"held-out: last {eval_ids.numel()} tokens of {HELD_OUT}")
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in SUFFIXES]
    if args.layers is not None:
        names = [n for n in names if int(n.split(".")[2]) < args.layers]
    log(f"{len(names)} target projections, {sum(modules[n].weight.numel() for n in names):,} weights")
    dense = {n: modules[n].weight.detach().clone() for n in names}

    def ppl(label):
        if args.no_eval:
            return float("nan")
        t = time.perf_counter()
        with torch.no_grad():
            r = sliding_window_perplexity(model, eval_ids, window=256, stride=128)
        log(f"  {label}: perplexity {r['perplexity']:.3f} ({time.perf_counter() - t:.0f} s)")
        return r["perplexity"]

    rows = [{"method": "dense fp32", "spec": "dense", "bpw": 32.0, "perplexity": ppl("dense"), "seconds": 0.0}]
    methods = [parse_method(s) for s in args.methods.split(",")]
    hessians = None
    t = time.perf_counter()
    if any(m["kind"] != "rtn" and m.get("feedback", True) for m in methods):
        with torch.no_grad():
            hessians = collect_hessians(model, calib, names)
    hess_s = time.perf_counter() - t
    log(f"hessians: {hess_s:.0f} s")
    total_w = sum(dense[n].numel() for n in names)
    for method in methods:
        t = time.perf_counter()
        extra_bits = sum(method["table_bits"] * dense[n].shape[0] * math.ceil(dense[n].shape[1] / method["g"])
                         for n in names)
        err_num = err_den = 0.0
        forced = flipped_or_zero = 0
        with torch.no_grad():
            for n in tqdm(names, desc=method["spec"], unit="layer"):
                W = dense[n]
                Q, extra = quantise_layer(method, W, None if hessians is None else hessians.get(n))
                extra_bits += extra
                if hessians is not None:
                    D = (Q - W)
                    Hn = hessians[n].float()
                    err_num += torch.einsum("ij,jk,ik->", D, Hn, D).item()
                    err_den += torch.einsum("ij,jk,ik->", W, Hn, W).item()
                # sign statistics: weights whose code has the opposite sign or zero
                flipped_or_zero += ((Q * W) < 0).sum().item()  # sign of the code opposite to the dense weight
                forced += ((Q == 0) & (W != 0)).sum().item()  # non-zero weight coded as 0
                modules[n].weight.data.copy_(Q)
        q_s = time.perf_counter() - t
        bpw = method["code_bits"] + extra_bits / total_w
        label = method["spec"]
        p = ppl(label)
        rows.append({"method": label, "spec": method["spec"], "bpw": round(bpw, 4), "perplexity": p,
                     "seconds": round(q_s, 1),
                     "output_rel_error": math.sqrt(err_num / err_den) if err_den else None,
                     "sign_flipped": flipped_or_zero / total_w, "zeroed": forced / total_w})
        log(f"  {label}: {bpw:.4f} bpw, quantised in {q_s:.0f} s, output rel err "
            f"{rows[-1]['output_rel_error']}, flipped {flipped_or_zero / total_w:.4f}, zeroed {forced / total_w:.4f}")
        for n in names:
            modules[n].weight.data.copy_(dense[n])

    dense_p = rows[0]["perplexity"]
    for r in rows:
        r["ratio"] = r["perplexity"] / dense_p if dense_p == dense_p else None
    result = {"model": str(folder), "held_out": f"last {eval_ids.numel()} tokens of {HELD_OUT}",
              "calibration": f"{args.calib_seqs} x {args.calib_len} tokens, other plays", "hessian_s": hess_s,
              "hessians": "from the dense model's activations (not sequential)", "layers": args.layers,
              "threads": torch.get_num_threads(), "machine": platform.platform(), "rows": rows,
              "total_s": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# Calibrated export vs RTN and GPTQ, SmolLM2-135M", "",
             f"Held-out: {result['held_out']} (window 256, stride 128). Calibration: {result['calibration']}; "
             f"Hessians {result['hessians']}, {hess_s:.0f} s. bpw: bits per target weight, tables counted.", "",
             LEGEND, "",
             "| method | bpw | perplexity | ratio to dense | output rel err | signs flipped | zeroed | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        oe = r.get("output_rel_error")
        sc = r.get("sign_flipped")
        zc = r.get("zeroed")
        lines.append(f"| {r['method']} | {r['bpw']:.4g} | {r['perplexity']:.2f} | "
                     f"{r['ratio'] or float('nan'):.3f} | {'' if oe is None else f'{oe:.4f}'} | "
                     f"{'' if sc is None else f'{sc:.4f}'} | {'' if zc is None else f'{zc:.4f}'} | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    log(f"total {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
