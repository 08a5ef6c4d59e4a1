"""Layer records: what loading must know of each compressed layer beyond the model's own config, stored compactly.

A record holds the layer's codec parameters, the length of its coded flip stream, and two checksums (of the
payload bytes, and of the decoded signs). Everything else (shape, Linear or Conv1D, bias) follows from the model
architecture, which the loader builds anyway. All records are concatenated in the order of the target layers and
written to ``config.json`` as one base64 string, with a checksum of the target names that pairs them with layers:

    record = varint(flip_bytes) varint(n) varint(param_1) .. varint(param_n) payload_checksum(8) sign_checksum(8)

About 22 bytes a layer (30 characters of base64), where a JSON record with its field names took about 380.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TYPE_CHECKING

from ...errors import CorruptCheckpointError
from .payload import CHECKSUM_BYTES
from .varint import ByteReader, varint

if TYPE_CHECKING:  # a codec is passed in; the format does not depend on the codecs
    from ..codecs import MagnitudeCodec

_CONTEXT = "the SignLock layer records in config.json"


def encode_record(record: dict, codec: MagnitudeCodec) -> bytes:
    """One layer's record as bytes."""
    values = codec.record_ints(record["codec_params"])
    return (varint(record["flip_bytes"]) + varint(len(values)) + b"".join(varint(v) for v in values)
            + bytes.fromhex(record["stored_checksum"]) + bytes.fromhex(record["sign_checksum"]))


def encoded_size(record: dict, codec: MagnitudeCodec) -> float:
    """Characters a record takes in config.json: its bytes in base64 (4 characters per 3 bytes)."""
    return len(encode_record(record, codec)) * 4 / 3


def encode_records(records: list[dict], codec: MagnitudeCodec) -> str:
    """Every layer's record, in target order, as one base64 string."""
    return base64.b64encode(b"".join(encode_record(record, codec) for record in records)).decode("ascii")


def decode_records(text: str, codec: MagnitudeCodec) -> list[dict]:
    """Every record of ``text``, in target order; a malformed string is a ``CorruptCheckpointError``."""
    try:
        reader = ByteReader(base64.b64decode(text.encode("ascii"), validate=True), _CONTEXT)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise CorruptCheckpointError(f"{_CONTEXT} are not valid base64") from None
    records = []
    while not reader.at_end():
        flip_bytes = reader.varint("flip stream length")
        values = [reader.varint("codec parameter") for _ in range(reader.varint("parameter count"))]
        records.append({"codec_params": codec.params_from_ints(values), "flip_bytes": flip_bytes,
                        "stored_checksum": reader.take(CHECKSUM_BYTES, "payload checksum").hex(),
                        "sign_checksum": reader.take(CHECKSUM_BYTES, "sign checksum").hex()})
    return records


def targets_checksum(names: list[str]) -> str:
    """Checksum of the target parameter names in order: pairs the records with the layers they describe."""
    return hashlib.blake2b("\n".join(names).encode(), digest_size=CHECKSUM_BYTES).hexdigest()
