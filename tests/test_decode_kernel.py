"""The fused vq and signmag decode kernels equal the torch path bit for bit (fp32 and bf16), for any shape, width
and group."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hf_signlock.quantization.format.bitpack import pack_uint
from hf_signlock.quantization.codecs import MagnitudeCodec, make_codec
from hf_signlock.signs import pack_signs

pytest.importorskip("numba")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), width=st.sampled_from([1, 2, 3, 4, 6, 8]),
       group=st.integers(1, 90), row_scales=st.sampled_from(["bf16", "log8", "layer"]), seed=st.integers(0, 2**16))
def test_kernel_matches_torch_path(rows, cols, width, group, row_scales, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, cols)
    codec = make_codec("vq", {"bits": width, "group": group, "row_scales": row_scales})
    params = codec.choose(shape, None)
    stored = codec.encode(torch.rand(shape, generator=g) * 0.05, params)
    groups = math.ceil(rows * cols / group)  # random codes and a codebook with zeros: every entry and the floor
    stored["codes"] = pack_uint(torch.randint(0, 1 << width, (groups,), generator=g), width)
    stored["codebook"] = torch.where(torch.rand(stored["codebook"].shape, generator=g) < 0.1, 0.0,
                                     torch.randn(stored["codebook"].shape, generator=g).abs()).to(torch.bfloat16)
    signs = torch.where(torch.rand(shape, generator=g) < 0.5, 1, -1).to(torch.int8)
    bits = pack_signs(signs)
    for dtype in (torch.float32, torch.bfloat16):
        fused = codec.decode_signed(stored, shape, params, bits, dtype)
        reference = MagnitudeCodec.decode_signed(codec, stored, shape, params, bits, dtype)  # the torch path
        assert fused.dtype == reference.dtype == dtype
        assert torch.equal(fused.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           reference.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert torch.equal(torch.sign(fused).to(torch.int8), signs)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), width=st.sampled_from([1, 2, 3, 4, 5, 8]),
       group=st.integers(1, 90), seed=st.integers(0, 2**16))
@example(rows=5, cols=64, width=3, group=16, seed=1)  # the kernel's 8-at-a-time path (cols and group multiples of 8)
@example(rows=3, cols=48, width=2, group=48, seed=2)
@example(rows=2, cols=24, width=8, group=8, seed=3)
@example(rows=2, cols=40, width=5, group=8, seed=4)
def test_signmag_kernel_matches_torch_path(rows, cols, width, group, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, cols)
    codec = make_codec("signmag", {"bits": width, "group": group})
    params = codec.choose(shape, None)
    stored = codec.encode(torch.rand(shape, generator=g) * 0.05, params)
    stored["codes"] = pack_uint(torch.randint(0, 1 << width, (rows * cols,), generator=g), width)  # every level
    stored["scales"] = torch.where(torch.rand(stored["scales"].shape, generator=g) < 0.1, 0.0,
                                   torch.rand(stored["scales"].shape, generator=g)).half()  # and the floor
    signs = torch.where(torch.rand(shape, generator=g) < 0.5, 1, -1).to(torch.int8)
    bits = pack_signs(signs)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        fused = codec.decode_signed(stored, shape, params, bits, dtype)
        reference = MagnitudeCodec.decode_signed(codec, stored, shape, params, bits, dtype)  # the torch path
        assert fused.dtype == reference.dtype == dtype
        assert torch.equal(fused.view(torch.int32 if dtype == torch.float32 else torch.int16),
                           reference.view(torch.int32 if dtype == torch.float32 else torch.int16))
        if dtype != torch.float16:  # the floor is below fp16's smallest subnormal: there the zero level is +-0
            assert torch.equal(torch.sign(fused).to(torch.int8), signs)


def test_kernel_path_is_taken_on_cpu():
    from hf_signlock.kernels import vq as decode_kernel

    decode_kernel._kernels = None
    test_kernel_matches_torch_path.hypothesis.inner_test(rows=3, cols=5, width=4, group=2, row_scales="bf16", seed=0)
    assert decode_kernel._kernels is not None
    from hf_signlock.kernels import signmag as signmag_kernel

    signmag_kernel._kernel = None
    test_signmag_kernel_matches_torch_path.hypothesis.inner_test(rows=3, cols=5, width=2, group=2, seed=0)
    assert signmag_kernel._kernel is not None


@pytest.mark.slow
def test_compiled_kernels_are_reused_by_the_next_process(tmp_path):
    """numba's on-disk cache must hit: a miss recompiles the kernels in every process (seconds on the first load)."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from hf_signlock.kernels import vq as dk, signs as sign_kernel, signmag as sk, output\n"
        "from hf_signlock import signs\n"
        "cb = torch.ones(256, 9).bfloat16(); rs = torch.ones(10).bfloat16(); bits = torch.zeros(10, dtype=torch.uint8)\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    dk.vq_decode(torch.zeros(9, dtype=torch.uint8), 8, 9, cb, rs, bits, (10, 8), 1e-3, dtype)\n"
        "    sk.signmag_decode(torch.zeros(20, dtype=torch.uint8), 2, 4, torch.ones(4).half(), torch.ones(10, 2).half(),\n"
        "                      bits, (10, 8), 1e-3, dtype)\n"
        "signs.seeded_signs(0, 'w', 640); signs.seeded_sign_bits(0, 'w', 640)\n"
        "kernels = [dk._kernels, sk._kernel, *output.compiled(), *sign_kernel._kernels]\n"
        "print(sum(k.stats.cache_hits.total() for k in kernels), sum(k.stats.cache_misses.total() for k in kernels))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    first, second = ([int(n) for n in run.stdout.split()] for run in runs)
    assert first[1] > 0  # compiled and written once ...
    assert second == [first[1], 0]  # ... then every kernel loaded from the cache, none recompiled
