"""``CompressedWeight``: one compressed target weight, its coded flips (or packed signs) and a magnitude codec's tables.

The module kinds that stand in for a target (``SignLockLinear`` for projections and an untied LM head,
``SignLockEmbedding`` for the token embedding) share everything about the stored weight: the one ``payload`` byte
tensor, the layer's record, decoding ``W = s * |W|~`` exactly in sign on the device the payload lives on, and
``verify``, which checks the stored bytes and the decoded signs against the checksums recorded at export, so a
corrupted, truncated or missing tensor, or the wrong seed, stops the load with the layer's name. They differ in what
they compute with it (a matmul, a row lookup) and in the dense module they turn back into.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import nn

from ..errors import CorruptCheckpointError
from ..signs import pack_signs, reference_signs, seeded_sign_bits
from .base_signs import base_layer_bits
from .codecs import make_codec
from .format.flip_coding import decode_flips, flip_count
from .format.payload import bits_digest, payload_digest, payload_layout


class CompressedWeight(nn.Module):
    """A compressed target weight: one ``payload`` byte tensor (tables, codes, coded flips), and the bias if any.

    Args:
        param_name: the weight's name in the dense model (its seeded signs are keyed by it).
        record: the layer's record (codec parameters, flip stream length, checksums).
        config: the model's ``SignLockConfig``.
        shape: the weight's shape as the dense module stores it.
        layout: "linear" (``[out, in]``), "conv1d" (GPT-2's ``[in, out]``) or "embedding" (``[vocab, dim]``).
        has_bias: whether the layer has a bias.
        dtype: the dtype the layer computes in (and of its bias).
    """

    def __init__(self, param_name: str, record: dict, config, shape: tuple[int, int], layout: str, has_bias: bool,
                 dtype: torch.dtype = torch.float32, device="meta"):
        super().__init__()
        self.param_name = param_name
        self.record = record
        self.config = config
        self.shape = tuple(shape)
        self.layout = layout
        self.dtype = dtype
        self.codec = make_codec(config.codec, config.codec_params)
        self.codec_params = record["codec_params"]
        # a layer whose flips would cost more than its signs stores them packed, whatever the config's source
        self.sign_source = "packed" if record.get("packed_signs") else config.sign_source
        numel = math.prod(self.shape)
        if self.sign_source == "template" and config.template_rank > min(self.shape):
            raise CorruptCheckpointError(f"{param_name}: template_rank {config.template_rank} exceeds the layer's "
                                         f"smaller side ({min(self.shape)})")
        if record["flip_bytes"] > _max_stored_bytes(numel):
            raise CorruptCheckpointError(f"{param_name}: its record names a {record['flip_bytes']:,}-byte flip stream "
                                         f"for {numel:,} signs")
        specs = self.codec.stored_specs(self.shape, getattr(torch, config.dtype or "float32"), self.codec_params)
        if self.sign_source == "packed":
            specs["sign_bits"] = ((math.ceil(numel / 8),), torch.uint8)
        else:
            specs["flips"] = ((record["flip_bytes"],), torch.uint8)
        self.sections = payload_layout(specs)
        size = sum(nbytes for _, nbytes, _, _ in self.sections.values())
        if size > _max_stored_bytes(numel):  # checked before anything is allocated (record values may be crafted)
            raise CorruptCheckpointError(f"{param_name}: its record ({self.codec_params}) gives a {size:,}-byte "
                                         f"payload for {numel:,} weights; no codec stores that much")
        # A frozen uint8 parameter (as bitsandbytes' packed weights and AQLM's codes are), not a buffer: transformers'
        # `model.device` is the first parameter's device, and generation asks for it twice a token; with payload
        # buffers the search walked past every compressed layer to the first norm weight.
        self.payload = nn.Parameter(torch.zeros(size, dtype=torch.uint8, device=device), requires_grad=False)
        self._views = (None, {})  # (the payload they view, name -> typed view); see stored_tensors
        self._memo = (None, None)  # (key, weakref to the last decoded weight); see decoded
        self.pinned_signs = None  # refinement: int8 signs held fixed while the tables train
        self.trainable_tables: dict[str, torch.Tensor] = {}  # refinement's float32 stand-ins for stored tables
        self._table_owner = ()  # (layer,) holding the codebook this layer shares; a tuple so it is no submodule
        self.base_bits = None  # sign_source "base": the base's packed signs, once loading has checked them
        self._signs = (None, None)  # (payload key, packed signs): rebuilt when the payload changes; see sign_bits
        self._operands = (None, None)  # (payload key, kernel operands); see kernel_operands
        if has_bias:
            self.bias = nn.Parameter(torch.empty(shape[1] if layout == "conv1d" else shape[0], dtype=dtype,
                                                 device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() change the dtype the layer computes in, as they would a float weight's.
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    # --- the stored tensors -----------------------------------------------------------------------------------------

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tables, flips or packed signs: typed views into ``payload`` (made once per payload tensor;
        writes go through ``write_stored``, in place, so the views stay current)."""
        if self._views[0] is not self.payload:
            if self.payload.storage_offset() % 8:  # a loaded payload may be a view starting at any byte
                self.payload = nn.Parameter(self.payload.clone(), requires_grad=False)
            self._views = (self.payload, {name: self.payload[offset:offset + nbytes].view(dtype).view(shape)
                                          for name, (offset, nbytes, dtype, shape) in self.sections.items()})
        return dict(self._views[1])

    def write_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors into their payload sections (export and refinement; shapes and dtypes must match)."""
        for name, tensor in tensors.items():
            offset, nbytes, dtype, shape = self.sections[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{self.param_name}: `{name}` must be {dtype} {shape}, got {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")
            self.payload[offset:offset + nbytes] = tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(
                self.payload.device)

    def magnitude_tensors(self) -> dict[str, torch.Tensor]:
        """The codec's tables (refinement's trainable stand-ins in their place; a shared codebook from its owner)."""
        stored = {name: t for name, t in self.stored_tensors().items() if name not in ("flips", "sign_bits")}
        stored.update(self.trainable_tables)
        if self._table_owner:
            stored["codebook"] = self._table_owner[0].magnitude_tensors()["codebook"]
        return stored

    @property
    def flips(self) -> int | None:
        """How many signs differ from the reference (None for packed signs); read from the flip stream's header."""
        if self.sign_source == "packed":
            return None
        return flip_count(self.stored_tensors()["flips"].cpu().numpy().tobytes())

    # --- decoding -------------------------------------------------------------------------------------------------

    def packed_signs(self) -> torch.Tensor:
        """The trained weight's signs, bit-packed (uint8, as ``pack_signs``) on the payload's device: the reference
        bits with the flips toggled."""
        stored = self.stored_tensors()
        if self.sign_source == "packed":
            return stored["sign_bits"]
        numel, device = math.prod(self.shape), self.payload.device
        stream = stored["flips"].cpu().numpy().tobytes()
        try:
            flips = decode_flips(stream, numel) if stream else ()  # small: decoded on the host; empty: no flips
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(f"{self.param_name}: {error}") from None
        if self.sign_source == "seed":
            bits = seeded_sign_bits(self.config.seed, self.param_name, numel, device=device)
        elif self.sign_source == "base":  # a copy: the base's bits are shared by every user of that base
            base = self.base_bits if self.base_bits is not None else base_layer_bits(self.config, self.param_name,
                                                                                      self.shape)
            bits = base.to(device, copy=True)
        else:
            bits = pack_signs(reference_signs(self.config.seed, self.param_name, self.shape, self.config.sign_source,
                                              self.config.template_rank, device=device))
        if not len(flips):
            return bits
        if device.type == "cpu":
            np.bitwise_xor.at(bits.numpy(), flips >> 3, (1 << (flips & 7)).astype(np.uint8))  # positions distinct
            return bits
        positions = torch.from_numpy(flips).to(device)
        # Distinct positions in one byte have distinct bits: their sum is the byte's toggle mask.
        mask = torch.zeros(bits.numel(), dtype=torch.int32, device=device)
        mask.index_add_(0, positions >> 3, (1 << (positions & 7)).to(torch.int32))
        return bits ^ mask.to(torch.uint8)

    def _payload_key(self) -> tuple:
        """What changes when the payload is replaced, rewritten in place or moved (to or from the CPU): the key of
        the caches built from it."""
        payload = self._parameters["payload"]  # not self.payload: nn.Module's attribute fallback is slow
        return payload.data_ptr(), payload._version, payload.is_cpu

    def sign_bits(self) -> torch.Tensor:
        """The weight's signs, bit-packed, built once per payload and kept: a view of the payload for packed signs,
        else 1 bit a weight of memory (what lookups and the kernels read instead of decoding the flips again)."""
        key = self._payload_key()
        if self._signs[0] != key:
            self._signs = (key, self.packed_signs())
        return self._signs[1]

    def kernel_operands(self):
        """What the compressed-domain kernels read of this layer (``kernels.matmul.Operands``), or None where they do
        not apply: another device than the CPU, a codec without kernels, GPT-2's transposed layout, refinement."""
        if torch.compiler.is_compiling():  # prepared at load or by an eager forward: no cache logic is traced
            return self._operands[1]
        key = self._payload_key()
        on_cpu = key[2]
        usable = on_cpu and self.pinned_signs is None and not self.trainable_tables
        if self._operands[0] == key and usable:  # every call of a layer's forward: kept to a few attribute reads
            return self._operands[1]
        if not usable or self.layout == "conv1d":
            return None
        try:
            operands = self.codec.kernel_operands(self.magnitude_tensors(), self.shape, self.codec_params,
                                                  self.sign_bits())
        except (ValueError, IndexError) as error:
            raise CorruptCheckpointError(f"{self.param_name}: the {self.config.codec} tables do not decode: "
                                         f"{error}") from None
        self._operands = (key, operands)
        return operands

    def check_payload(self) -> None:
        """Check that the payload was loaded and that its bytes are those written at export."""
        if self.payload.device.type == "meta":
            raise CorruptCheckpointError(f"{self.param_name}: the checkpoint has no `payload` tensor for this layer")
        if payload_digest(self.payload) != self.record["stored_checksum"]:
            raise CorruptCheckpointError(
                f"{self.param_name}: the stored payload does not match the checksum recorded at export "
                "(corrupted or truncated file, or a tensor from another checkpoint)"
            )

    def verify(self, payload_checked: bool = False) -> torch.Tensor:
        """Check the stored bytes (unless ``payload_checked``) and the decoded signs; returns the signs, bit-packed.
        Packed signs are payload bytes, so the payload's checksum covers them; signs rebuilt from a seed or a base
        are checked against their own."""
        if not payload_checked:
            self.check_payload()
        for name, table in self.magnitude_tensors().items():  # the only floats a weight is made from
            if table.is_floating_point() and not torch.isfinite(table).all():
                raise CorruptCheckpointError(f"{self.param_name}: its stored `{name}` holds NaN or infinite values, "
                                             "which export never writes (a corrupted or edited file)")
        sign_bits = self.packed_signs()
        if self.sign_source != "packed" and bits_digest(sign_bits) != self.record["sign_checksum"]:
            if self.sign_source == "base":
                cause = (f"the base model {self.config.base_model!r} does not give the signs the fine-tune was "
                         "exported against")
            else:
                cause = (f"the seed ({self.config.seed}) or sign source ({self.config.sign_source!r}) is not the one "
                         "the model was trained with")
            raise CorruptCheckpointError(
                f"{self.param_name}: the decoded signs do not match the checksum recorded at export; {cause}"
            )
        self._signs = (self._payload_key(), sign_bits)  # checked: kept for lookups and the kernels
        return sign_bits

    def decode_weight(self, sign_bits: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = sign * |W|~ in ``dtype`` on the payload's device; from ``sign_bits`` (packed) if given, else decoded
        now. While refinement pins int8 signs (``pinned_signs``), the product is built with torch ops so gradients
        reach the tables."""
        stored = self.magnitude_tensors()
        try:
            if self.pinned_signs is not None:
                magnitude = self.codec.decode(stored, self.shape, self.codec_params)
                return (self.pinned_signs.to(magnitude.device, magnitude.dtype) * magnitude).to(dtype)
            sign_bits = self.packed_signs() if sign_bits is None else sign_bits
            return self.codec.decode_signed(stored, self.shape, self.codec_params, sign_bits, dtype)
        except (ValueError, IndexError, RuntimeError) as error:
            raise CorruptCheckpointError(f"{self.param_name}: the {self.config.codec} magnitudes do not decode: {error}")

    def decoded(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The weight in ``dtype`` on ``device``, decoded at most once while anyone still holds the last one: the
        layer keeps only a weak reference, so it costs no memory of its own."""
        key = (self.payload.data_ptr(), self.payload._version, dtype, torch.device(device))
        memo_key, ref = self._memo
        weight = ref() if memo_key == key else None
        if weight is None:
            weight = self.decode_weight(dtype=dtype).to(device)
            self._memo = (key, weakref.ref(weight))
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight in the layer's dtype (a new tensor; writing to it changes nothing; decoded once while
        it is held). Model init code that touches ``.weight`` before loading gets an empty meta tensor."""
        if self.payload.device.type == "meta":
            return torch.empty(self.shape, device="meta", dtype=self.dtype)
        return self.decoded(self.dtype, self.payload.device)

    def dense(self, sign_bits: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain module this layer stands for, holding its decoded weight."""
        raise NotImplementedError


def _max_stored_bytes(numel: int) -> int:
    """More than any layer of ``numel`` weights stores (float32 magnitudes with packed signs are 4.125 bytes a
    weight; tiny layers carry tables of their own)."""
    return 8 * numel + (1 << 16)


def link_shared_tables(layers) -> None:
    """Point the layers that share a model-level codebook at the one layer that stores it."""
    layers = list(layers)
    owners = [layer for layer in layers if layer.codec_params.get("codebook_owner")]
    for layer in layers:
        if layer.codec_params.get("shared") and not layer.codec_params.get("codebook_owner"):
            if len(owners) != 1:
                raise CorruptCheckpointError(
                    f"{layer.param_name}: shares a vq codebook, but {len(owners)} layers of the checkpoint store one "
                    "(exactly one must)"
                )
            layer._table_owner = (owners[0],)
