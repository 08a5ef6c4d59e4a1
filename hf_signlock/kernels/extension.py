"""Generation's product entered from C++ (``csrc/signlock_product.cpp``): a torch extension around the kernels'
``sl_matmul`` that allocates the output itself.

At batch 1 a small layer's product takes ~2 us in the kernel, and the ctypes call around it ~7 us more (the
output's ``new_empty``, argument conversion); through this extension the module's call takes ~7 us instead of
~10.5, which is what lets a small compressed model generate faster than its dense self (``bench/bench_decode.py``).
Built on first use with torch's ``cpp_extension`` (about 30 s, once; cached in ``$HF_SIGNLOCK_CACHE/kernels``
under a name that hashes the source and torch's version), or ahead of time by ``report()`` (``make setup``).
Where it cannot be built (no C++ compiler, no ninja, no Python headers) or ``HF_SIGNLOCK_TORCH_EXTENSION=0``,
``product()`` returns None (with one logged warning that names the cause) and the ctypes call runs: the same
kernel, the same numbers, ~3.5 us more a call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os

import torch

from . import native

SOURCE = native.SOURCE.with_name("signlock_product.cpp")
logger = logging.getLogger(__name__)


@functools.cache
def product():
    """``product(x, layer_address, rows, cols, threads) -> y``, or None where the extension cannot be had."""
    if os.environ.get("HF_SIGNLOCK_TORCH_EXTENSION", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    lib = native.library()
    if lib is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    build_dir = native.cache_dir() / f"signlock_product-{key}"
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            logger.warning("hf_signlock: building the generation product's torch extension (once, about 30 s)")
        module = load(name=f"signlock_product_{key}", sources=[str(SOURCE)], build_directory=str(build_dir),
                      extra_cflags=["-O2"], verbose=False)
        module.set_kernel(ctypes.cast(lib.sl_matmul, ctypes.c_void_p).value)
        return module.product
    except Exception as error:  # noqa: BLE001 (any build or load failure: the ctypes call runs instead)
        # logged, not warned: nothing is wrong with the results (the same kernel runs), only ~3.5 us a call slower
        logger.warning("hf_signlock: generation's product goes through ctypes (~3.5 us a call slower): its torch "
                       "extension did not build here: %s: %s", type(error).__name__, str(error)[-300:])
        return None


def report() -> None:
    """Build the kernels and this extension now (``make setup`` does) and say what was built."""
    native.report()
    if native.library() is not None:
        print("hf_signlock generation product:", "through the torch extension" if product() is not None else
              "through ctypes (the torch extension did not build)")
