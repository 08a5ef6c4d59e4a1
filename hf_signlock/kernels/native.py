"""The compiled compressed-domain kernels (``csrc/signlock_kernels.c``): built once with the system C compiler,
cached, loaded with ``ctypes``.

Why C and not numba (the decode kernels' tool): the matrix-vector product is bound by how fast 2-4-bit codes become
floats, and the fast form (8 codes shifted into lanes by one instruction, looked up in a level table held in a
register by one permute, the signs applied as a lane mask) needs SIMD permutes that numba's loops do not produce.
``bench/bench_kernels.py`` measures both. Why not a torch C++ extension: compiling against torch's headers takes
about a minute per build; this file compiles in about a second and needs nothing but a C compiler and OpenMP.

The library is built on first use into ``$HF_SIGNLOCK_CACHE`` (default ``~/.cache/hf_signlock``)``/kernels``,
under a name that hashes the source, the compiler flags and the compiler, so that a changed source or another
machine's instruction set never loads a stale build; ``native.report()`` builds it ahead of time (``make setup``
does). With AVX-512 (F, VL, BW), FMA and F16C on the CPU the SIMD paths are compiled in, else
the portable loops only. Linked against ``libgomp.so.1``: the OpenMP runtime torch has already loaded, so the two
share one thread pool instead of fighting over the cores.

When no library can be had (no compiler, a failed build, a platform other than Linux/x86-64, a thread count
``HF_SIGNLOCK_THREADS`` that is not a positive number), ``library()`` returns None after one warning that names the
cause, and callers take the pure-torch path, which gives the same numbers; ``HF_SIGNLOCK_KERNELS=0`` asks for that
path without a warning. The kernels run on ``HF_SIGNLOCK_THREADS`` threads, else on torch's thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch  # loaded before the library: its libgomp.so.1 is the OpenMP runtime the kernels then share

from ..paths import cache_root

SOURCE = Path(__file__).with_name("csrc") / "signlock_kernels.c"
SIMD_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx512vbmi")
_CPU_FLAGS_NEEDED = ("avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512vbmi")
BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp", "-fno-strict-aliasing")

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


class Layer(ctypes.Structure):
    """The C side's ``SlLayer``: one layer's stored weight as the kernels read it, built once per layer and passed
    by address (a call then converts six arguments, not sixteen: at batch 1 that was a third of a small layer's
    time)."""

    _fields_ = [("kind", _i64), ("rows", _i64), ("cols", _i64), ("codes_len", _i64), ("width", _i64),
                ("group", _i64), ("table_rows", _i64), ("codes", _ptr), ("table", _ptr), ("scales", _ptr),
                ("signs", _ptr), ("slots", _ptr)]


SIGNATURES = {  # name -> argument types; all return int (0: done; -1: out of memory; -2: an index out of range),
    # but sl_vq_slots_bytes (a size, RESULT_TYPES)
    "sl_matmul": [_ptr, _ptr, _i64, _ptr, _int, _int],
    "sl_decode_rows": [_ptr, _i64, _i64, _ptr, _int],
    "sl_gather_rows": [_ptr, _ptr, _i64, _ptr, _int],
    "sl_vq_slots_bytes": [_ptr],
    "sl_vq_slots_build": [_ptr, _ptr],
    "sl_simd": [],
    "sl_version": [],
}


RESULT_TYPES = {"sl_vq_slots_bytes": _i64}


class KernelUnavailable(RuntimeError):
    """Why the compiled kernels cannot be used here (the message names the cause)."""


def cache_dir() -> Path:
    """Where built libraries are kept."""
    return cache_root() / "kernels"


def cpu_supports_simd() -> bool:
    """Whether the CPU has every instruction set the SIMD paths are compiled for (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(flag in flags for flag in _CPU_FLAGS_NEEDED)


def compiler() -> str:
    """The C compiler to build with: ``$CC``, else gcc or cc on the PATH."""
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate and shutil.which(candidate):
            return candidate
    raise KernelUnavailable("no C compiler found (install gcc, or set CC)")


def build(simd: bool | None = None) -> Path:
    """Build the library (if not already cached) and return its path; raises ``KernelUnavailable``."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"the kernels are built for Linux x86-64, not {platform.system()} "
                                f"{platform.machine()}")
    simd = cpu_supports_simd() if simd is None else simd
    cc = compiler()
    flags = [*BASE_FLAGS, *(SIMD_FLAGS if simd else ())]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[:1]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((flags, version)).encode()).hexdigest()[:16]
    target = cache_dir() / f"signlock_kernels-{key}{'-simd' if simd else ''}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # built beside, moved into place when complete
        built = Path(scratch) / target.name
        result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            raise KernelUnavailable(f"building {SOURCE.name} with {cc} failed: {result.stderr.strip()[-800:]}")
        os.replace(built, target)
    return target


def _thread_setting() -> int | None:
    """``HF_SIGNLOCK_THREADS`` as a positive int, None when unset; raises ``KernelUnavailable`` when it is not one."""
    value = os.environ.get("HF_SIGNLOCK_THREADS")
    if value is None:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise KernelUnavailable(f"HF_SIGNLOCK_THREADS={value!r} is not a positive thread count (unset it to use "
                                "torch's, or give a number >= 1)")
    return threads


_threads_override: int | None = None  # HF_SIGNLOCK_THREADS as read when the library was loaded


def threads() -> int:
    """Threads the kernels run on: ``HF_SIGNLOCK_THREADS`` (read when the library is loaded: the environment is too
    slow to read on every call), else torch's intra-op thread count."""
    return _threads_override or max(1, torch.get_num_threads())


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning naming why) where they cannot be built or loaded."""
    if os.environ.get("HF_SIGNLOCK_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return None  # asked for the torch path: no warning
    global _threads_override
    try:
        _threads_override = _thread_setting()
        lib = ctypes.CDLL(str(build()))
        for name, argtypes in SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = RESULT_TYPES.get(name, _int)
        return lib
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"hf_signlock: compressed layers run on the pure-torch path (decode, then matmul), which is "
                      f"slower: the compiled kernels are unavailable: {error}", RuntimeWarning, stacklevel=2)
        return None


def report() -> None:
    """Build the library now (``make setup`` does) and say what was built."""
    lib = library()
    print("hf_signlock kernels:", "unavailable (the pure-torch path will run)" if lib is None else
          f"built ({'AVX-512' if lib.sl_simd() else 'portable'}) in {cache_dir()}")
