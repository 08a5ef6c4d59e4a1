"""The compressed-domain kernels (``hf_signlock.kernels.matmul``): equal to decode-then-matmul for every codec, shape,
batch, dtype, layout and sign source; the pure-torch fallback equal to them; the causes that send a layer to that
fallback (no compiler, a CPU without the instructions, a thread count of 0) warn and never crash; a code past its
table is a typed error at load."""

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from hf_signlock import CorruptCheckpointError, SignLockConfig, apply_gap_init, quantize_model
from hf_signlock.kernels import matmul, native
from hf_signlock.quantization.codecs import FLOOR
from hf_signlock.quantization.embedding import SignLockEmbedding, SignLockTiedHead
from hf_signlock.quantization.format.bitpack import pack_uint
from hf_signlock.quantization.layers import compressed_layers
from hf_signlock.quantization.linear import SignLockLinear

SEED = 5
FP32_TOLERANCE = 1e-5  # max |kernel - reference| / max |reference|: the bound for fp32 logits
BF16_TOLERANCE = 1e-3  # of bf16 logits, in norm: see test_model_logits_equal_the_decode_path


def relative_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def products_close(y: torch.Tensor, reference: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   tolerance: float = FP32_TOLERANCE):
    """``y`` within ``tolerance`` of the decode path's product, relative to the size of the products summed
    (max over outputs of sum |w x|: another summation order moves a cancelling sum by that much), plus what the
    kernels leave out by design: the 1e-12 floor of each decoded magnitude, at most 1e-12 x sum |x| per output."""
    scale = (x.float().abs() @ weight.abs().T).max().item()
    slack = FLOOR * x.float().abs().sum(-1).max().item()
    error = (y.float() - reference.float()).abs().max().item()
    assert error <= tolerance * scale + slack, (error, scale, slack)


def random_operands(kind: int, rows: int, cols: int, width: int, group: int, seed: int) -> matmul.Operands:
    """A layer of random codes (every table entry, zeros too), scales and signs."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 256, (math.ceil(rows * cols / 8),), dtype=torch.uint8, generator=g)
    if kind == matmul.SIGNMAG:
        codes = pack_uint(torch.randint(0, 1 << width, (rows * cols,), generator=g), width)
        levels = torch.rand(1 << width, generator=g).half().float()
        levels[0] = 0.0
        scales = torch.rand(rows, math.ceil(cols / group), generator=g).half()
        return matmul.Operands(kind, codes, levels, scales, signs, width, group, rows, cols)
    codes = pack_uint(torch.randint(0, 1 << width, (math.ceil(rows * cols / group),), generator=g), width)
    codebook = torch.rand(1 << width, group, generator=g).bfloat16().float()
    return matmul.Operands(kind, codes, codebook, torch.rand(rows, generator=g), signs, width, group, rows, cols)


requires_kernels = pytest.mark.skipif(native.library() is None, reason="the compiled kernels do not build here")


@requires_kernels
@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from([matmul.SIGNMAG, matmul.VQ]), rows=st.integers(1, 40), cols=st.integers(1, 100),
       width=st.sampled_from([1, 2, 3, 4, 5, 8]), group=st.integers(1, 100), batch=st.integers(1, 20),
       seed=st.integers(0, 2**16))
@example(kind=matmul.SIGNMAG, rows=9, cols=576, width=2, group=72, batch=1, seed=1)  # SmolLM2's 3.25-bit layers
@example(kind=matmul.SIGNMAG, rows=9, cols=576, width=3, group=72, batch=3, seed=2)  # its 4.25-bit ones
@example(kind=matmul.SIGNMAG, rows=5, cols=96, width=4, group=32, batch=5, seed=3)   # the 16-entry table
@example(kind=matmul.SIGNMAG, rows=3, cols=48, width=1, group=16, batch=2, seed=4)
@example(kind=matmul.VQ, rows=7, cols=128, width=4, group=6, batch=1, seed=5)        # groups across rows
@example(kind=matmul.VQ, rows=70, cols=128, width=4, group=11, batch=6, seed=6)      # chunks of 32 rows, 3 of them
@example(kind=matmul.VQ, rows=33, cols=128, width=8, group=21, batch=1, seed=7)      # the quickstart's 1-bpp head
@example(kind=matmul.VQ, rows=3, cols=4100, width=4, group=64, batch=2, seed=8)      # a row wider than a chunk
@example(kind=matmul.VQ, rows=5, cols=40, width=3, group=65, batch=1, seed=9)        # past the SIMD copy's width
@example(kind=matmul.SIGNMAG, rows=1, cols=1, width=1, group=1, batch=1, seed=3)     # every weight at the floor
def test_kernels_equal_decode_then_matmul(kind, rows, cols, width, group, batch, seed):
    ops = random_operands(kind, rows, cols, width, group, seed)
    weight = matmul.reference_rows(ops, 0, rows)
    lib = native.library()
    assert torch.equal(matmul.decode_rows(ops, 0, rows, lib), weight)  # the tiles: bit for bit
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed))
    reference = x @ weight.T
    products_close(matmul.small_batch(x, ops, lib), reference, x, weight)
    products_close(matmul.tiled(x, ops, lib), reference, x, weight)
    products_close(matmul.linear(x.view(batch, 1, cols), ops).view(batch, rows), reference, x, weight)
    # bf16 activations in and out: the product of the bf16 input in float32, rounded once
    x16 = x.bfloat16()
    out16 = matmul.small_batch(x16, ops, lib)
    assert out16.dtype == torch.bfloat16
    products_close(out16, (x16.float() @ weight.T).bfloat16(), x16, weight, 2 ** -7)
    # prefill's bf16 tiles: the weight rounded to bf16, as a bf16 model's decode-then-matmul path rounds it
    tiled16 = matmul.tiled(x16, ops, lib)
    assert tiled16.dtype == torch.bfloat16
    products_close(tiled16, x16 @ weight.bfloat16().T, x16, weight, 2 ** -7)
    assert torch.equal(matmul.gather_rows(ops, torch.tensor([rows - 1, 0])), weight[[rows - 1, 0]])
    # the lookup written in bf16 by the kernel: rounded as torch rounds (round to nearest even)
    assert torch.equal(matmul.gather_rows(ops, torch.tensor([rows - 1, 0]), torch.bfloat16),
                       weight[[rows - 1, 0]].bfloat16())


@pytest.mark.skipif(native.library() is None or not native.library().sl_simd(),
                    reason="the compiled kernels, with their SIMD paths, do not build here")
@pytest.mark.parametrize("rows, cols, width, group", [
    (16, 128, 4, 11),  # the quickstart's attention projections: codewords across rows, one block of 12 slots
    (9, 352, 4, 8),    # its gate / up: 44 slots, 3 blocks, every row starting on a codeword
    (5, 352, 4, 7),    # its down projection: 51 slots in 4 blocks
    (7, 100, 2, 12),   # 2-bit codes (one load, shifted into lanes); 9 slots
    (6, 64, 1, 8),     # 1-bit codes; exactly 8 slots
    (11, 200, 3, 11),  # 3-bit codes: one code at a time
    (3, 40, 4, 2),     # short codewords: 20 slots, the last codes read one at a time near the end
])
def test_slot_layout_equals_the_decode_path(rows, cols, width, group):
    """vq layers with a book of up to 16 codewords multiply through the slot layout built at first use: the same
    products as the decode path and as the chunk decode, for one row of x, a block of 4 and a block and a part."""
    ops = random_operands(matmul.VQ, rows, cols, width, group, rows + cols)
    plain = dataclasses.replace(ops, lay_out=False)
    lib = native.library()
    ops.address()
    assert ops._slots is None  # an embedding's lookups never build it
    ops.product_address()
    assert ops._slots is not None and plain.layout_tensors() == []
    weight = matmul.reference_rows(ops, 0, rows)
    for batch in (1, 4, 6):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        y = matmul.small_batch(x, ops, lib)
        products_close(y, x @ weight.T, x, weight)
        products_close(y, matmul.small_batch(x, plain, lib), x, weight)
    x16 = torch.randn(1, cols).bfloat16()
    products_close(matmul.small_batch(x16, ops, lib), (x16.float() @ weight.T).bfloat16(), x16, weight, 2 ** -7)


@requires_kernels
def test_slot_layout_only_where_the_lanes_are_used():
    """Codewords long against the row (fewer than 8 slots a block) and books over 16 codewords keep the chunk
    decode; so do signmag layers."""
    for kind, rows, cols, width, group in ((matmul.VQ, 4, 128, 2, 28), (matmul.VQ, 4, 128, 5, 8),
                                           (matmul.SIGNMAG, 4, 128, 2, 32)):
        ops = random_operands(kind, rows, cols, width, group, 0)
        ops.product_address()
        assert ops.layout_tensors() == []


def test_torch_fallback_gives_the_same_numbers(monkeypatch):
    ops = random_operands(matmul.SIGNMAG, 30, 64, 3, 16, 0)
    x = torch.randn(5, 64)
    expected = x @ matmul.reference_rows(ops, 0, 30).T
    monkeypatch.setattr(native, "library", lambda: None)
    assert not matmul.compiled()
    assert relative_max(matmul.linear(x, ops), expected) <= FP32_TOLERANCE
    assert relative_max(matmul.linear(x[:1], ops), expected[:1]) <= FP32_TOLERANCE


def test_a_vq_code_past_a_shared_codebook_is_refused():
    ops = random_operands(matmul.VQ, 4, 16, 4, 8, 0)
    small = dataclasses.replace(ops, table=ops.table[:3])  # a codebook of 3 words for 4-bit codes
    with pytest.raises(ValueError, match="past the codebook"):
        matmul.check_codes_in_table(small)
    matmul.check_codes_in_table(ops)


# --- why the kernels may be unavailable: a warning naming the cause, then the torch path --------------------------


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``native.library()`` rebuilt from scratch in a temporary cache, restored afterwards."""
    monkeypatch.setenv("HF_SIGNLOCK_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def test_no_compiler_warns_and_falls_back(fresh_library, monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert native.library() is None


def test_a_failed_build_warns_and_falls_back(fresh_library, monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.warns(RuntimeWarning, match="failed"):
        assert native.library() is None


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_thread_count_of_zero_warns_and_falls_back(fresh_library, monkeypatch, value):
    monkeypatch.setenv("HF_SIGNLOCK_THREADS", value)
    with pytest.warns(RuntimeWarning, match="HF_SIGNLOCK_THREADS"):
        assert native.library() is None


def test_a_cpu_without_the_instructions_gets_the_portable_build(fresh_library, monkeypatch):
    if native.library() is None:
        pytest.skip("no compiler here")
    native.library.cache_clear()
    monkeypatch.setattr(native, "cpu_supports_simd", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = native.library()
    assert lib is not None and lib.sl_simd() == 0
    for kind, width, group in ((matmul.SIGNMAG, 2, 72), (matmul.SIGNMAG, 3, 16), (matmul.VQ, 4, 6)):
        ops = random_operands(kind, 12, 576, width, group, 1)
        x = torch.randn(3, 576)
        assert relative_max(matmul.small_batch(x, ops, lib), x @ matmul.reference_rows(ops, 0, 12).T) <= 1e-5


# --- whole models: every layout and sign source, fp32 and bf16 ----------------------------------------------------

CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=96),
    "llama-tied": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      tie_word_embeddings=True),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32),
}
CODECS = {"signmag2": ("signmag", {"bits": 2, "group": 16}), "signmag3": ("signmag", {"bits": 3, "group": 24}),
          "signmag4": ("signmag", {"bits": 4, "group": 8}), "vq": ("vq", {"bits": 4, "group": 6})}


def compressed_model(arch: str, codec: str, sign_source: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    targets = apply_gap_init(model, seed=SEED, gap=0.5, embeddings=True)
    with torch.no_grad():
        for t in targets:
            t.param.add_(torch.randn_like(t.param) * t.init_std * 0.3)
    name, params = CODECS[codec]
    return quantize_model(model, SignLockConfig(seed=SEED, codec=name, codec_params=params, sign_source=sign_source,
                                                target_embeddings=True))


def relative_norm(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


def logits_both_ways(model, monkeypatch, ids):
    with torch.no_grad():
        kernel = model(ids).logits
        with monkeypatch.context() as patch:  # the decode-then-matmul path
            patch.setattr(native, "library", lambda: None)
            for layer in compressed_layers(model).values():
                layer._operands = (None, None)
            for kind in {type(layer) for layer in compressed_layers(model).values()}:
                patch.setattr(kind, "kernel_operands", lambda self: None)
            reference = model(ids).logits
    for layer in compressed_layers(model).values():
        layer._operands = (None, None)
    return kernel, reference


@requires_kernels
@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("sign_source", ["seed", "template", "packed"])
def test_model_logits_equal_the_decode_path(arch, codec, sign_source, monkeypatch):
    model = compressed_model(arch, codec, sign_source)
    layers = compressed_layers(model)
    assert any(isinstance(layer, SignLockEmbedding) for layer in layers.values())
    if arch != "gpt2":  # GPT-2's Conv1D ([in, out]) decodes, then multiplies
        assert all(layer.kernel_operands() is not None for layer in layers.values())
    if arch == "llama-tied":
        assert isinstance(model.get_output_embeddings(), SignLockTiedHead)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    exact = {}  # fp32 logits of the decode path
    for rows in (ids[:1, :1], ids):  # one row: the matrix-vector kernel; 18 rows: the tiles
        kernel, exact[rows.numel()] = logits_both_ways(model, monkeypatch, rows)
        assert relative_max(kernel, exact[rows.numel()]) <= FP32_TOLERANCE
    model.to(torch.bfloat16)
    for rows in (ids[:1, :1], ids):
        kernel, reference = logits_both_ways(model, monkeypatch, rows)
        assert kernel.dtype == torch.bfloat16 and kernel.shape == exact[rows.numel()].shape
        # In bf16 the decode path rounds every weight to bf16 before its matmul; the matrix-vector kernel uses the
        # stored values exactly and rounds once per output, the tiles round as the decode path does. Both against
        # the fp32 logits: the kernels at least as close, within 1e-3.
        kernel_error = relative_norm(kernel, exact[rows.numel()])
        decode_error = relative_norm(reference, exact[rows.numel()])
        assert kernel_error <= decode_error + BF16_TOLERANCE, (rows.numel(), kernel_error, decode_error)
        assert decode_error < 0.05  # bf16 rounding, not noise: the comparison above means something


@requires_kernels
def test_generation_runs_compressed_and_matches_the_decode_path(monkeypatch):
    model = compressed_model("llama-tied", "signmag2", "seed")
    ids = torch.tensor([[1, 2, 3, 4]])
    kernel = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    monkeypatch.setattr(SignLockLinear, "kernel_operands", lambda self: None)
    monkeypatch.setattr(SignLockEmbedding, "kernel_operands", lambda self: None)
    assert torch.equal(kernel, model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False))


@requires_kernels
def test_lora_style_training_runs_on_the_kernels_forward():
    model = compressed_model("llama", "signmag2", "seed")
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    weight = layer.decode_weight()
    assert torch.allclose(x.grad, 2 * (x @ weight.T) @ weight, rtol=1e-4, atol=1e-5)


def test_corrupt_tables_are_a_typed_error_when_the_operands_are_made():
    model = compressed_model("llama", "signmag2", "seed")
    layer = model.model.layers[0].mlp.up_proj
    layer.record = dict(layer.record)
    layer.codec_params = {"bits": 3, "group": 16}  # levels stored for 2 bits, codes read as 3
    layer._operands = (None, None)
    with pytest.raises(CorruptCheckpointError, match="levels"):
        layer.kernel_operands()


@requires_kernels
def test_torch_compile_traces_the_compressed_model_in_one_graph():
    """The compressed forward and lookup are custom ops: ``fullgraph=True`` fails on any graph break."""
    model = compressed_model("llama-tied", "signmag2", "seed")
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert relative_max(compiled, eager) <= FP32_TOLERANCE
