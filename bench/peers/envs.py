"""One Python environment per peer, made once and cached: each tool gets the versions it asks for (llm-compressor
pins its own transformers) without touching the project's environment.

Environments live in ``$HF_SIGNLOCK_CACHE`` (default ``~/.cache/hf_signlock``)``/peers/<name>``, named by a hash
of their requirements, so a changed requirement makes a new one; an environment counts as made only once its
install finished (a ``.installed`` marker written last), so an interrupted install is redone, not used half made.
torch is pinned to the project's CPU build (``constraints-cpu.txt``): a bare ``torch`` resolves to a CUDA build of
several GB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hf_signlock import paths

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints-cpu.txt"

# What each peer's own environment installs (the project's own peers run in the project's environment: None).
# hf_signlock is not installed there: the peer scripts import it from the repository (PYTHONPATH), for perplexity.
REQUIREMENTS: dict[str, list[str] | None] = {
    "hf_signlock": None,
    "llama.cpp": None,
    "hqq": ["torch==2.13.0", "transformers==5.24.0", "hqq==0.2.8.post1", "accelerate", "xxhash", "numba",
            "datasets", "pyyaml", "tqdm"],
    "bitsandbytes": ["torch==2.13.0", "transformers==5.24.0", "bitsandbytes==0.50.2", "accelerate", "xxhash",
                     "numba", "datasets", "pyyaml", "tqdm"],
    "llm-compressor": ["torch==2.13.0", "llmcompressor==0.14.0.1", "xxhash", "numba", "pyyaml", "tqdm"],
}


class PeerInstallError(RuntimeError):
    """A peer's environment could not be made (the message carries pip's last lines)."""


def cache_root() -> Path:
    """Where the peers' environments and builds are kept."""
    return paths.cache_root() / "peers"


def python_for(peer: str) -> str:
    """The interpreter that runs ``peer``'s script: the project's own, or its environment's (made if needed)."""
    requirements = REQUIREMENTS[peer]
    if requirements is None:
        return sys.executable
    key = hashlib.sha256(repr(sorted(requirements)).encode()).hexdigest()[:12]
    folder = cache_root() / f"{peer}-{key}"
    python = folder / "bin" / "python"
    if (folder / ".installed").exists():
        return str(python)
    shutil.rmtree(folder, ignore_errors=True)  # a half-made environment from an interrupted install
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), *requirements],
                          check=False, capture_output=True, text=True,
                          env={**os.environ, "DISABLE_CUDA": "1"})  # hqq's setup: no CUDA extension build
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise PeerInstallError(f"pip install of {' '.join(requirements)} failed: {tail}")
    (folder / ".installed").write_text("\n".join(requirements) + "\n")
    return str(python)
