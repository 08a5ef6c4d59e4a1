"""LEB128 varints and a bounds-checked reader: the byte framing of flip streams and layer records."""

from __future__ import annotations

from ...errors import CorruptCheckpointError


def varint(value: int) -> bytes:
    """``value`` (>= 0) in 7-bit groups, least significant first, high bit set on all but the last byte."""
    if value < 0:
        raise ValueError(f"a varint must be >= 0, got {value}")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class ByteReader:
    """Reads varints and byte strings from ``data``; anything past its end is a ``CorruptCheckpointError`` that
    names ``context`` (what is being read) and the field."""

    def __init__(self, data: bytes, context: str):
        self.data, self.at, self.context = data, 0, context

    def varint(self, what: str) -> int:
        value = shift = 0
        while True:
            if self.at >= len(self.data) or shift > 63:
                raise CorruptCheckpointError(f"{self.context}: the {what} field is truncated or malformed")
            byte = self.data[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise CorruptCheckpointError(f"{self.context}: the {what} is truncated ({len(self.data)} bytes)")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def at_end(self) -> bool:
        return self.at == len(self.data)
