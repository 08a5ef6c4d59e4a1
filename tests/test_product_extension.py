"""Generation's product through the torch extension (``hf_signlock.kernels.extension``): the same kernel as the
ctypes call, so the same numbers bit for bit; off on request; a failed build is logged and the ctypes call runs."""

import pytest
import torch
from test_matmul_kernels import random_operands

from hf_signlock.kernels import extension, matmul, native

pytestmark = pytest.mark.skipif(native.library() is None, reason="the compiled kernels do not build here")


@pytest.fixture
def fresh_extension():
    extension.product.cache_clear()
    yield
    extension.product.cache_clear()


def ctypes_product(x: torch.Tensor, ops: matmul.Operands) -> torch.Tensor:
    y = x.new_empty((*x.shape[:-1], ops.rows))
    assert native.library().sl_matmul(ops.product_address(), x.data_ptr(), x.numel() // ops.cols, y.data_ptr(),
                                      matmul._DTYPE_CODES[x.dtype], native.threads()) == 0
    return y


@pytest.mark.parametrize("kind,rows,cols,width,group", [(matmul.SIGNMAG, 9, 576, 2, 72), (matmul.VQ, 70, 128, 4, 11),
                                                        (matmul.VQ, 33, 128, 8, 21)])
@pytest.mark.parametrize("shape", [(1, 1), (3,), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extension_equals_the_ctypes_call(kind, rows, cols, width, group, shape, dtype):
    product = extension.product()
    if product is None:
        pytest.skip("the torch extension does not build here")
    ops = random_operands(kind, rows, cols, width, group, seed=3)
    x = torch.randn(*shape, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = product(x, ops.product_address(), ops.rows, ops.cols, native.threads())
    assert y.shape == (*shape, rows) and y.dtype == dtype
    assert torch.equal(y, ctypes_product(x, ops))
    assert torch.equal(matmul.small_batch(x, ops, native.library()), y)  # what the layers call


def test_extension_off_on_request(fresh_extension, monkeypatch):
    monkeypatch.setenv("HF_SIGNLOCK_TORCH_EXTENSION", "0")
    assert extension.product() is None
    ops = random_operands(matmul.VQ, 7, 128, 4, 6, seed=5)
    x = torch.randn(1, 128)
    assert torch.equal(matmul.small_batch(x, ops, native.library()), ctypes_product(x, ops))


def test_failed_build_logs_why_and_the_ctypes_call_runs(fresh_extension, monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level("WARNING", logger=extension.__name__):
        assert extension.product() is None
        ops = random_operands(matmul.SIGNMAG, 5, 96, 4, 32, seed=3)
        x = torch.randn(2, 96)
        for _ in range(3):
            assert torch.equal(matmul.small_batch(x, ops, native.library()), ctypes_product(x, ops))
    [record] = caplog.records  # once, at the build: not again per call
    assert "did not build here" in record.getMessage() and "no C++ compiler" in record.getMessage()
