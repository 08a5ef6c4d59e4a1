"""``SignLockLinear``: one compressed target layer: coded flips (or packed signs) plus a magnitude codec's tensors.

It stands in for an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``[in, out]``): the stored shape and
positions are the original parameter's. ``decode_weight`` rebuilds W = s * |W|~ exactly in sign; ``verify`` checks
the stored tensors and the decoded signs against the checksums recorded at export, so a corrupted, truncated or
missing tensor, or the wrong seed, stops the load with the layer's name instead of producing garbage.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CorruptCheckpointError
from .flip_coding import decode_flips
from .magnitude_codecs import make_codec
from .reference import pack_signs, unpack_signs
from .signs import reference_signs, seeded_sign_bits

_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def payload_layout(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, tuple]:
    """Where each stored tensor lives in a layer's one ``payload`` byte tensor: name -> (offset, bytes, dtype, shape).

    One tensor per layer, because the loader's cost is per stored tensor (four per layer were a large part of the gap
    to a dense load). Sections go widest element first (in spec order within a width): every offset is then a multiple
    of its element size with no padding, so the views need no copy and every payload byte is a stored bit.
    """
    layout, offset = {}, 0
    for name, (shape, dtype) in sorted(specs.items(), key=lambda item: -item[1][1].itemsize):
        nbytes = math.prod(shape) * dtype.itemsize
        layout[name] = (offset, nbytes, dtype, tuple(shape))
        offset += nbytes
    return layout


def payload_digest(payload: torch.Tensor) -> str:
    """Checksum of a layer's payload: its size and every byte (hashed in place, no copy)."""
    digest = hashlib.blake2b(f"payload|{payload.numel()}|".encode(), digest_size=8)
    digest.update(payload.detach().contiguous().cpu().numpy())
    return digest.hexdigest()


def sign_digest(signs: torch.Tensor) -> str:
    """Checksum of int8 signs: that of their packed bits."""
    bits = np.packbits(signs.reshape(-1).cpu().numpy() > 0, bitorder="little")  # = pack_signs, in one numpy pass
    return bits_digest(torch.from_numpy(bits))


def bits_digest(sign_bits: torch.Tensor) -> str:
    return hashlib.blake2b(sign_bits.cpu().contiguous().numpy(), digest_size=8).hexdigest()


class SignLockLinear(nn.Module):
    def __init__(self, param_name: str, record: dict, config, device="meta"):
        super().__init__()
        self.param_name = param_name  # the weight's name in the dense model: its seeded signs are keyed by it
        self.record = record
        self.config = config
        self.shape = tuple(record["shape"])
        self.layout = record["layout"]
        in_features, out_features = self.shape[::-1] if self.layout == "linear" else self.shape
        self.in_features, self.out_features = in_features, out_features
        self.codec = make_codec(config.codec, config.codec_params)
        self.codec_params = record.get("codec_params", {})
        specs = self.codec.stored_specs(self.shape, _DTYPES[record["dtype"]], self.codec_params)
        if config.sign_source == "packed":
            specs["sign_bits"] = ((math.ceil(math.prod(self.shape) / 8),), torch.uint8)
        else:
            specs["flips"] = ((record["flip_bytes"],), torch.uint8)
        self.sections = payload_layout(specs)
        size = sum(nbytes for _, nbytes, _, _ in self.sections.values())
        self.register_buffer("payload", torch.zeros(size, dtype=torch.uint8, device=device), persistent=True)
        self._views = (None, {})  # (the payload they view, name -> typed view); see stored_tensors
        self.pinned_signs = None
        self.trainable_tables: dict[str, torch.Tensor] = {}  # refinement's float32 stand-ins for stored tables
        self._table_owner = ()  # (layer,) holding the codebook this layer shares; a tuple so it is no submodule
        if record["bias"]:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=_DTYPES[record["dtype"]], device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tables, flips or packed signs: typed views into ``payload`` (made once per payload tensor;
        writes go through ``write_stored``, in place, so the views stay current)."""
        if self._views[0] is not self.payload:
            if self.payload.storage_offset() % 8:  # a loaded payload may be a view starting at any byte
                self.payload = self.payload.clone()
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
        stored = {name: t for name, t in self.stored_tensors().items() if name not in ("flips", "sign_bits")}
        stored.update(self.trainable_tables)
        if self._table_owner:
            stored["codebook"] = self._table_owner[0].magnitude_tensors()["codebook"]
        return stored

    # --- decoding -------------------------------------------------------------------------------------------------

    def packed_signs(self) -> torch.Tensor:
        """The trained weight's signs, bit-packed (uint8, as ``pack_signs``): seeded bits with the flips toggled."""
        numel = math.prod(self.shape)
        if self.config.sign_source == "packed":
            return self.stored_tensors()["sign_bits"].cpu()
        flips = decode_flips(self.stored_tensors()["flips"].cpu().numpy().tobytes(), numel)
        if len(flips) != self.record["flips"]:
            raise CorruptCheckpointError(
                f"{self.param_name}: the flip stream holds {len(flips)} flips, the config records {self.record['flips']}"
            )
        if self.config.sign_source == "seed":
            bits = seeded_sign_bits(self.config.seed, self.param_name, numel).numpy().copy()
        else:
            bits = pack_signs(reference_signs(self.config.seed, self.param_name, self.shape, self.config.sign_source,
                                              self.config.template_rank)).numpy()
        np.bitwise_xor.at(bits, flips >> 3, (1 << (flips & 7)).astype(np.uint8))  # positions are distinct
        return torch.from_numpy(bits)

    def decode_signs(self) -> torch.Tensor:
        """int8 -1/+1 signs of the trained weight, in its stored shape."""
        return unpack_signs(self.packed_signs(), self.shape)

    def verify(self) -> torch.Tensor:
        """Check the stored tensors and the decoded signs; returns the signs, bit-packed."""
        if self.payload.device.type == "meta":
            raise CorruptCheckpointError(f"{self.param_name}: the checkpoint has no `payload` tensor for this layer")
        if payload_digest(self.payload) != self.record["stored_checksum"]:
            raise CorruptCheckpointError(
                f"{self.param_name}: the stored payload does not match the checksum recorded at export "
                "(corrupted or truncated file, or a tensor from another checkpoint)"
            )
        sign_bits = self.packed_signs()
        if bits_digest(sign_bits) != self.record["sign_checksum"]:
            raise CorruptCheckpointError(
                f"{self.param_name}: the decoded signs do not match the checksum recorded at export; the seed "
                f"({self.config.seed}) or sign source ({self.config.sign_source!r}) is not the one the model was "
                "trained with"
            )
        return sign_bits

    def decode_weight(self, sign_bits: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = sign * |W|~ in ``dtype``; from ``sign_bits`` (packed) if given, else decoded now. While refinement
        pins int8 signs (``pinned_signs``), the product is built with torch ops so gradients reach the tables."""
        stored = self.magnitude_tensors()
        try:
            if self.pinned_signs is not None:
                magnitude = self.codec.decode(stored, self.shape, self.codec_params)
                return (self.pinned_signs.to(magnitude.device, magnitude.dtype) * magnitude).to(dtype)
            sign_bits = self.packed_signs() if sign_bits is None else sign_bits
            return self.codec.decode_signed(stored, self.shape, self.codec_params, sign_bits, dtype)
        except (ValueError, IndexError, RuntimeError) as error:
            raise CorruptCheckpointError(f"{self.param_name}: the {self.config.codec} magnitudes do not decode: {error}")

    @property
    def weight(self) -> torch.Tensor:
        """The decoded dense weight (a new tensor; writing to it changes nothing). Model init code that touches
        ``.weight`` before loading gets an empty meta tensor of the right shape."""
        if self.payload.device.type == "meta":
            return torch.empty(self.shape, device="meta")
        return self.decode_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.decode_weight().to(x.device, x.dtype)
        if self.layout == "linear":
            return F.linear(x, weight, self.bias)
        flat = x.reshape(-1, self.in_features)  # as Conv1D computes it (addmm), so exact codecs match bit for bit
        out = flat @ weight if self.bias is None else torch.addmm(self.bias.to(x.dtype), flat, weight)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"signs={self.config.sign_source}, codec={self.config.codec}, flips={self.record['flips']}")


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


def flip_positions(trained_signs: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    return torch.nonzero((trained_signs != reference).reshape(-1)).reshape(-1).numpy()
