"""llama.cpp's points: the dense folder converted to GGUF (f16), then its k-quants and i-quants, each quantized with
an importance matrix taken from the protocol's calibration text (``llama-imatrix``; the i-quants need one).

Per point: bits over the target projections and the whole file, read from the GGUF's own tensor table (the types
each tensor really holds: SmolLM2's 576-wide rows are not a multiple of the k-quants' 256-weight super-blocks, so
some tensors fall back to other types); perplexity twice, by ``llama-perplexity`` (its own chunks) and by
``hf_signlock``'s evaluation on the protocol's windows after transformers dequantizes the GGUF
(``from_pretrained(..., gguf_file=...)``); generation tokens/s at batch 1 from ``llama-bench`` (llama.cpp's own
runner).

Points: ``f16``, ``Q4_K_M``, ``Q3_K_M``, ``Q3_K_S``, ``Q2_K``, ``IQ3_XXS``, ``IQ2_XS`` (or any type ``llama-quantize``
takes). The protocol's ``llama_cpp``: ``source`` (llama.cpp's sources, from the ``llama-cpp-python`` source
distribution), ``deps`` (where ``sentencepiece`` is installed for the converter), ``work`` (the files), ``build``
(a build folder to reuse; default: in ``work``).
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

from common import ROOT, emit, file_fields, guarded, log, perplexity, read_protocol, row

sys.path.insert(0, str(ROOT / "bench"))
import llama_cpp_tools as tools

POINTS = ("f16", "Q4_K_M", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ3_XXS", "IQ2_XS")
TARGET_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_bits(path: Path) -> tuple[float, str]:
    """Bits of the target projections' tensors in the GGUF, and which types its tensors hold (type: count)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    target_bits, types = 0, collections.Counter()
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] += 1
        if any(f".{name}." in tensor.name for name in TARGET_TENSORS):
            target_bits += 8 * int(tensor.n_bytes)
    return target_bits, ", ".join(f"{name} x{count}" for name, count in types.most_common())


def text_file(protocol: dict, key: str, out: Path) -> Path:
    """The protocol's token ids of ``key`` (``eval_ids`` or ``calibration``) as text, for llama.cpp's tools (which
    tokenise it again with the GGUF's own tokenizer: the same tokenizer, so the same tokens up to joins)."""
    from transformers import AutoTokenizer

    path = out / f"{key}.txt"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(protocol["model"])
        ids = protocol[key]
        windows = ids if ids and isinstance(ids[0], list) else [ids]
        path.write_text("\n".join(tokenizer.decode(window) for window in windows))
    return path


def point(protocol: dict, binaries: Path, f16: Path, imatrix: tuple[Path, float] | None, name: str) -> dict:
    from transformers import AutoModelForCausalLM

    out = f16.parent
    start = time.perf_counter()
    gguf = f16 if name == "f16" else tools.quantize(binaries, f16, name, protocol["threads"], imatrix[0])
    quantize_s = time.perf_counter() - start
    target_bits, types = gguf_bits(gguf)
    fields = {**file_fields(protocol, gguf.stat().st_size, target_bits), "detail": types,
              "quantize_s": None if name == "f16" else quantize_s + imatrix[1]}
    log(f"llama.cpp {name}: llama-perplexity")
    fields["perplexity_llama_cpp"] = tools.perplexity(binaries, gguf, text_file(protocol, "eval_ids", out),
                                                      protocol["window"], protocol["threads"])
    log(f"llama.cpp {name}: perplexity on the protocol's windows (dequantized by transformers)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32").eval()
    fields["perplexity"] = perplexity(model, protocol)
    del model
    log(f"llama.cpp {name}: llama-bench")
    speed = tools.bench(binaries, gguf, protocol["threads"], prompt=protocol["window"], generate=64, repeats=3)
    fields["tokens_per_s"] = speed["generate"]["tokens_per_s"]
    return fields


def main(argv: list[str]) -> None:
    protocol, out = read_protocol(argv[0]), Path(argv[1])
    points = argv[2:] or list(POINTS)
    settings = protocol.get("llama_cpp") or {}
    work = Path(settings.get("work") or out / "llama.cpp")
    work.mkdir(parents=True, exist_ok=True)
    try:
        log("llama.cpp: building its tools (once; about 15 minutes on 2 cores)")
        build = Path(settings.get("build") or work / "build")
        binaries = tools.build(Path(settings["source"]), build, tools.TOOLS + tools.CALIBRATION_TOOLS)
        f16 = tools.convert(Path(settings["source"]), Path(protocol["model"]), work / "model-f16.gguf",
                            Path(settings["deps"]) if settings.get("deps") else None)
        imatrix = None
        if any(name != "f16" for name in points):
            log("llama.cpp: importance matrix over the calibration text")
            start = time.perf_counter()
            matrix = tools.importance_matrix(binaries, f16, text_file(protocol, "calibration", work),
                                             work / "imatrix.gguf", protocol["window"], protocol["threads"])
            imatrix = (matrix, time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 (no build: every point is a row with the reason)
        detail = getattr(error, "stderr", None) or ""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        message = f"llama.cpp did not build or convert here: {type(error).__name__}: {error} {detail[-300:]}"
        emit([row("llama.cpp", name, error=message) for name in points])
        return
    emit([guarded("llama.cpp", name, lambda name=name: point(protocol, binaries, f16, imatrix, name))
          for name in points])


if __name__ == "__main__":
    main(sys.argv[1:])
