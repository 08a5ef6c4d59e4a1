"""``x W^T`` with ``W`` read from its stored form: the compressed layers' forward on the CPU.

``Operands`` holds what the kernels read of one layer, all views of (or small tables beside) what is already in
memory: the codes and scales inside the payload, the level table or codebook in float32, the signs bit-packed.
``linear`` picks the path by the number of rows of ``x``:

- up to ``SMALL_BATCH`` rows (generation, batch 1 or a few): the matrix-vector kernel, each weight decoded in
  registers once per block of up to four rows of ``x``;
- more (prefill, evaluation, training): row tiles of ``W`` decoded into a buffer of about ``TILE_BYTES`` (it stays
  in cache) and multiplied by torch's GEMM, tile after tile; no layer is ever dense in memory as a whole. A bf16
  model's tiles are rounded to bf16 (as its decode-then-matmul path rounds the whole weight) and multiplied by the
  bf16 GEMM, which on CPUs with bf16 instructions runs about twice as fast as the float32 one.

Without the compiled library (``native.library()`` is None) the same two paths run on torch: the tiles are decoded
by the codec's own decode (``reference_rows``), so the numbers are those of the decode-then-matmul path.

``compressed_linear`` is the same function as a torch custom op (``torch.ops.hf_signlock.compressed_linear``), so
that ``torch.compile`` traces a model through it as one opaque node instead of breaking its graph there.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np
import torch

from ..quantization.format.bitpack import unpack_uint_at
from . import extension, native

SIGNMAG, VQ = 0, 1
SMALL_BATCH = 16  # rows of x up to which the matrix-vector kernel beats decoding tiles for a GEMM (bench_kernels)
TILE_BYTES = 1 << 19  # float32 bytes of one decoded tile of W


@dataclass(eq=False, slots=True)
class Operands:
    """One layer's stored weight as the kernels read it (``W`` is ``rows x cols``, ``y = x W^T``).

    ``table``: the levels (signmag, ``2**width`` float32) or the codebook (vq, ``K x group`` float32); ``scales``:
    the group scales (signmag, ``rows x groups`` float16) or the row scales (vq, ``rows`` float32); ``signs``: the
    signs, bit-packed (1 = +1, LSB first); ``codes``: ``width``-bit codes, LSB first.
    """

    kind: int
    codes: torch.Tensor
    table: torch.Tensor
    scales: torch.Tensor
    signs: torch.Tensor
    width: int
    group: int
    rows: int
    cols: int
    lay_out: bool = True
    _native: native.Layer | None = field(default=None, init=False, repr=False)
    _native_address: int = field(default=0, init=False, repr=False)
    _product_address: int = field(default=0, init=False, repr=False)
    _slots: torch.Tensor | None = field(default=None, init=False, repr=False)

    def address(self) -> int:
        """The address of this layer's ``native.Layer`` (built on first use; it points into these tensors, which
        this object keeps alive)."""
        if self._native is None:
            self._native = native.Layer(self.kind, self.rows, self.cols, self.codes.numel(), self.width, self.group,
                                        self.table.shape[0], self.codes.data_ptr(), self.table.data_ptr(),
                                        self.scales.data_ptr(), self.signs.data_ptr(), None)
            self._native_address = ctypes.addressof(self._native)
        return self._native_address

    def product_address(self) -> int:
        """``address()``, for the matrix-vector product: with ``lay_out`` (operands kept for a layer's lifetime,
        not made for one call), a vq layer whose codebook has at most 16 codewords first gets the kernels' slot
        layout (the codebook transposed, the signs regrouped by slot: about as many bytes as the packed signs),
        which makes its product several times faster. Built on the first product, so that an embedding only ever
        looked up never holds it."""
        if self._product_address:
            return self._product_address
        address = self.address()
        lib = native.library()
        size = lib.sl_vq_slots_bytes(address) if self.lay_out and lib is not None else 0
        if size > 0:
            self._slots = torch.empty(size, dtype=torch.uint8)
            lib.sl_vq_slots_build(address, self._slots.data_ptr())
            self._native.slots = self._slots.data_ptr()
        self._product_address = address
        return address

    def layout_tensors(self) -> list[torch.Tensor]:
        """The tensors the kernels' own layout added (for memory accounting)."""
        return [] if self._slots is None else [self._slots]


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # what the kernels read and write directly


def small_batch(x: torch.Tensor, ops: Operands, lib) -> torch.Tensor:
    """``x W^T`` (``x``: ``[..., cols]``, float32 or bfloat16, contiguous; the result in its dtype) by the
    matrix-vector kernel. Generation's path, once per layer and token: kept to the product's own work (one output
    allocation, one call), as every microsecond here is paid about 200 times a token by a small model: through the
    torch extension (which allocates the output in C++) where it built, else by ctypes."""
    through_cpp = extension.product()
    if through_cpp is not None:
        return through_cpp(x, ops.product_address(), ops.rows, ops.cols, native.threads())
    y = x.new_empty((*x.shape[:-1], ops.rows))  # new_empty: a microsecond less than torch.empty
    if lib.sl_matmul(ops.product_address(), x.data_ptr(), x.numel() // ops.cols, y.data_ptr(), _DTYPE_CODES[x.dtype],
                     native.threads()):
        raise MemoryError(f"the kernels could not allocate {x.numel() // ops.cols} x {max(ops.rows, ops.cols)} "
                          "floats")
    return y


def decode_rows(ops: Operands, first: int, count: int, lib, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``first .. first + count`` of ``W`` in float32 (as the decode path gives them)."""
    if out is None:
        out = torch.empty(count, ops.cols, dtype=torch.float32)
    if lib is None:
        out.copy_(reference_rows(ops, first, count))
    elif lib.sl_decode_rows(ops.address(), first, count, out.data_ptr(), native.threads()):
        raise MemoryError(f"the kernels could not allocate a buffer for {count} x {ops.cols} floats")
    return out


def tiled(x: torch.Tensor, ops: Operands, lib) -> torch.Tensor:
    """``x W^T`` (``x``: n x cols, float32 or bfloat16; the result in its dtype) tile by tile: decode ``W``'s rows
    into a cache-sized buffer (rounded to bf16 for a bf16 ``x``), GEMM, next."""
    tile_rows = max(8, min(ops.rows, TILE_BYTES // (4 * ops.cols)))
    if tile_rows < ops.rows and tile_rows >= 64:
        tile_rows -= tile_rows % 64  # whole blocks for the GEMM: a few % faster than 227 or 85 rows, one layer timed
    # Each tile's product is a column block of y, written in place (GEMM's leading dimension): row-major as
    # F.linear gives it, with no transposed copy of the whole output after (that was a sixth of a prefill).
    y = torch.empty(x.shape[0], ops.rows, dtype=x.dtype)
    buffer = torch.empty(tile_rows, ops.cols, dtype=torch.float32)
    rounded = None if x.dtype == torch.float32 else torch.empty(tile_rows, ops.cols, dtype=x.dtype)
    for first in range(0, ops.rows, tile_rows):
        count = min(tile_rows, ops.rows - first)
        tile = decode_rows(ops, first, count, lib, buffer[:count])
        if rounded is not None:
            tile = rounded[:count].copy_(tile)  # round to nearest even, as the dense weight's cast does
        torch.mm(x, tile.t(), out=y[:, first:first + count])
    return y


def linear(x: torch.Tensor, ops: Operands) -> torch.Tensor:
    """``x W^T`` for ``x`` of any shape ``[..., cols]`` and floating dtype; the result in ``x``'s dtype. Through the
    custom op while ``torch.compile`` traces (one opaque node, no graph break); directly in eager mode (the op's
    dispatch costs about as much as a small layer's product)."""
    if torch.compiler.is_compiling():
        return compressed_linear(x, ops.codes, ops.table, ops.scales, ops.signs, ops.kind, ops.width, ops.group,
                                 ops.rows, ops.cols)
    return _linear(x, ops)


def _linear(x: torch.Tensor, ops: Operands) -> torch.Tensor:
    lib = native.library()
    if lib is not None and x.numel() <= SMALL_BATCH * ops.cols:
        if x.dtype in _DTYPE_CODES and x.is_contiguous():  # generation's case: no op but the product itself
            return small_batch(x, ops, lib)
        return small_batch(x.float().contiguous(), ops, lib).to(x.dtype)
    work = x.dtype if x.dtype in _DTYPE_CODES else torch.float32  # float16 and others: through float32
    y = tiled(x.reshape(-1, ops.cols).to(work).contiguous(), ops, lib)
    return y.to(x.dtype).reshape(*x.shape[:-1], ops.rows)


def compiled() -> bool:
    """Whether the compiled kernels are loaded (else every path here runs on torch)."""
    return native.library() is not None


def gather_rows(ops: Operands, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``rows`` (int64 indices, in range) of ``W`` in ``dtype``: an embedding lookup."""
    if torch.compiler.is_compiling():
        return compressed_rows(rows, ops.codes, ops.table, ops.scales, ops.signs, ops.kind, ops.width, ops.group,
                               ops.rows, ops.cols).to(dtype)
    return _gather_rows(ops, rows, dtype)


def check_token_ids(rows: torch.Tensor, count: int) -> None:
    """Raise ``IndexError`` (as ``nn.Embedding`` does) if an id in ``rows`` is outside ``[0, count)``: for the paths
    whose lookups index without a check (the compiled ``sl_gather_rows`` checks them itself)."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= count):
        raise _token_id_error(count)


def _token_id_error(count: int) -> IndexError:
    return IndexError(f"index out of range in self: token ids must be in [0, {count})")


def _gather_rows(ops: Operands, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    lib = native.library()
    if lib is None:
        check_token_ids(rows, ops.rows)
        out = torch.empty(rows.numel(), ops.cols, dtype=torch.float32)
        for i, row in enumerate(rows.tolist()):
            out[i] = reference_rows(ops, row, 1)[0]
        return out.to(dtype)
    direct = dtype in _DTYPE_CODES  # written in the model's dtype by the kernel: no cast op after it
    out = torch.empty(rows.numel(), ops.cols, dtype=dtype if direct else torch.float32)
    if rows.dtype != torch.int64 or not rows.is_contiguous():
        rows = rows.to(torch.int64).contiguous()
    status = lib.sl_gather_rows(ops.address(), rows.data_ptr(), rows.numel(), out.data_ptr(),
                                _DTYPE_CODES[out.dtype])
    if status == -2:  # checked in C before anything is read
        raise _token_id_error(ops.rows)
    if status:
        raise MemoryError(f"the kernels could not allocate a buffer for a row of {ops.cols} floats")
    return out if direct else out.to(dtype)


def reference_rows(ops: Operands, first: int, count: int) -> torch.Tensor:
    """Rows of ``W`` by torch ops alone: the fallback, and what the tests hold the kernels to."""
    positions = torch.arange(first * ops.cols, (first + count) * ops.cols, dtype=torch.int64)
    signs = ((ops.signs[positions >> 3] >> (positions & 7).to(torch.uint8)) & 1).float() * 2 - 1
    if ops.kind == SIGNMAG:
        codes = unpack_uint_at(ops.codes, ops.width, positions)
        columns = positions % ops.cols
        scale = ops.scales.float()[positions // ops.cols, columns // ops.group]
        magnitude = ops.table[codes] * scale
    else:
        codes = unpack_uint_at(ops.codes, ops.width, positions // ops.group)
        magnitude = ops.table[codes, positions % ops.group] * ops.scales[positions // ops.cols]
    return (signs * magnitude.clamp_min(1e-12)).view(count, ops.cols)


def check_codes_in_table(ops: Operands) -> None:
    """Raise ``ValueError`` if a vq code points past the codebook (possible only when a layer's codes are wider than
    the codebook it shares): the kernels index the codebook without a check."""
    if ops.kind != VQ or ops.table.shape[0] >= 1 << ops.width:
        return
    count = -(-ops.rows * ops.cols // ops.group)
    bits = np.unpackbits(ops.codes.numpy(), count=count * ops.width, bitorder="little").reshape(count, ops.width)
    if count and int((bits.astype(np.int64) << np.arange(ops.width)).sum(1).max()) >= ops.table.shape[0]:
        raise ValueError("a vq code points past the codebook")


# --- the custom op: what torch.compile sees ------------------------------------------------------------------------


@torch.library.custom_op("hf_signlock::compressed_linear", mutates_args=())
def compressed_linear(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                      signs: torch.Tensor, kind: int, width: int, group: int, rows: int, cols: int) -> torch.Tensor:
    """``x W^T`` (see ``linear``) as a torch op."""
    return _linear(x, Operands(kind, codes, table, scales, signs, width, group, rows, cols, lay_out=False))


@compressed_linear.register_fake
def _(x, codes, table, scales, signs, kind, width, group, rows, cols):
    return x.new_empty((*x.shape[:-1], rows))


@torch.library.custom_op("hf_signlock::compressed_rows", mutates_args=())
def compressed_rows(index: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                    signs: torch.Tensor, kind: int, width: int, group: int, rows: int, cols: int) -> torch.Tensor:
    """Rows ``index`` of ``W`` in float32 (see ``gather_rows``) as a torch op: an embedding lookup."""
    return _gather_rows(Operands(kind, codes, table, scales, signs, width, group, rows, cols, lay_out=False),
                        index.reshape(-1))


@compressed_rows.register_fake
def _(index, codes, table, scales, signs, kind, width, group, rows, cols):
    return index.new_empty((index.numel(), cols), dtype=torch.float32)
