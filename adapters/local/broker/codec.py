"""AMQP 1.0 message-section codec for the hot path.

The broker never needs a full message object: it stores the sections a client sent as raw bytes and
only re-encodes the two sections it owns per delivery (header and message annotations). Splitting
is done with a tiny width-table skipper instead of a full decode, so storing and forwarding a
message costs a few slices and one ``bytes.join``.
"""

from __future__ import annotations

import struct
from typing import Any  # AMQP values: whatever proton's type mapping makes of a client's bytes, and back

from proton import Data, Described, symbol

HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78

_SYMBOLIC_DESCRIPTORS = {
    b"amqp:header:list": HEADER,
    b"amqp:delivery-annotations:map": DELIVERY_ANNOTATIONS,
    b"amqp:message-annotations:map": MESSAGE_ANNOTATIONS,
    b"amqp:properties:list": PROPERTIES,
    b"amqp:application-properties:map": APPLICATION_PROPERTIES,
    b"amqp:data:binary": DATA,
    b"amqp:amqp-sequence:list": AMQP_SEQUENCE,
    b"amqp:amqp-value:*": AMQP_VALUE,
    b"amqp:footer:map": FOOTER,
}

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")


class CodecError(ValueError):
    """The bytes a client sent are not a well-formed AMQP message."""


# Bytes after the constructor by its high nibble: >= 0 fixed width, -1/-4 a 1/4-byte size prefix.
_WIDTHS = (None, None, None, None, 0, 1, 2, 4, 8, 16, -1, -4, -1, -4, -1, -4)


def skip_value(buf: bytes, pos: int) -> int:
    """Return the offset just past the AMQP value that starts at ``pos``.

    Every AMQP constructor encodes its width in the high nibble, which is all a skipper needs.
    """
    code = buf[pos]
    pos += 1
    if code == 0x00:
        return skip_value(buf, skip_value(buf, pos))
    width = _WIDTHS[code >> 4]
    if width is None:
        raise CodecError(f"unknown AMQP constructor 0x{code:02x}")
    if width >= 0:
        return pos + width
    if width == -1:
        return pos + 1 + buf[pos]
    return pos + 4 + int(_U32.unpack_from(buf, pos)[0])


def _descriptor(buf: bytes, pos: int) -> tuple[int, int]:
    """Return the section code and the offset of the described value."""
    if buf[pos] != 0x00:
        raise CodecError("message section is not a described type")
    code = buf[pos + 1]
    if code == 0x53:
        return buf[pos + 2], pos + 3
    if code == 0x80:
        return int.from_bytes(buf[pos + 2 : pos + 10], "big") & 0xFFFFFFFF, pos + 10
    if code in (0xA3, 0xB3):
        end = skip_value(buf, pos + 1)
        start = pos + 3 if code == 0xA3 else pos + 6
        name = bytes(buf[start:end])
        if name not in _SYMBOLIC_DESCRIPTORS:
            raise CodecError(f"unknown section descriptor {name!r}")
        return _SYMBOLIC_DESCRIPTORS[name], end
    raise CodecError(f"unsupported section descriptor constructor 0x{code:02x}")


def split_sections(buf: bytes) -> list[tuple[int, int, int, int]]:
    """Split an encoded message into ``(code, start, value_start, end)`` tuples."""
    sections: list[tuple[int, int, int, int]] = []
    pos = 0
    size = len(buf)
    try:
        while pos < size:
            code, value_pos = _descriptor(buf, pos)
            end = skip_value(buf, value_pos)
            if end > size:
                raise CodecError("truncated message section")
            sections.append((code, pos, value_pos, end))
            pos = end
    except IndexError as exc:
        raise CodecError("truncated message") from exc
    return sections


def looks_like_message(buf: bytes) -> bool:
    """Whether ``buf`` is entirely a sequence of AMQP message sections.

    The SDK's batch format (message-format 0x80013700, which proton does not expose) wraps each
    message as a data section; recognising an encoded message inside is how batches are detected.
    """
    if len(buf) < 3 or buf[0] != 0x00:
        return False
    try:
        sections = split_sections(buf)
    except CodecError:
        return False
    return bool(sections) and all(HEADER <= s[0] <= FOOTER for s in sections)


def data_section_payload(buf: bytes, value_pos: int, end: int) -> bytes:
    """Return the binary payload of a data section's value."""
    code = buf[value_pos]
    if code == 0xA0:
        return bytes(buf[value_pos + 2 : end])
    if code == 0xB0:
        return bytes(buf[value_pos + 5 : end])
    raise CodecError("data section does not hold binary")


def decode_value(buf: bytes) -> Any:
    """Decode one AMQP value into Python objects with proton."""
    data = Data()
    data.decode(buf)
    data.rewind()
    data.next()
    return data.get_object()


def section_value(section: bytes) -> Any:
    """Decode a whole described section and return its value."""
    value = decode_value(section)
    return value.value if isinstance(value, Described) else value


def encode_value(value: Any) -> bytes:
    """Encode one Python value with proton's type mapping."""
    data = Data()
    data.put_object(value)
    return data.encode()


def encode_section(code: int, value: Any) -> bytes:
    """Encode ``value`` as a described message section with the given code."""
    return bytes((0x00, 0x53, code)) + encode_value(value)


def map_pairs(encoded_map: bytes) -> tuple[int, bytes]:
    """Return ``(element count, element bytes)`` of an encoded map, for splicing into another."""
    code = encoded_map[0]
    if code == 0xC1:
        return encoded_map[2], encoded_map[3:]
    if code == 0xD1:
        return int(_U32.unpack_from(encoded_map, 5)[0]), encoded_map[9:]
    raise CodecError("value is not a map")


def sym_key(name: bytes) -> bytes:
    """Encode a short symbol used as a map key."""
    return bytes((0xA3, len(name))) + name


def enc_long(value: int) -> bytes:
    """Encode a signed 64-bit AMQP long."""
    return b"\x81" + _I64.pack(value)


def enc_timestamp(ms: int) -> bytes:
    """Encode an AMQP timestamp (milliseconds since the Unix epoch)."""
    return b"\x83" + _I64.pack(ms)


def enc_uuid(raw: bytes) -> bytes:
    """Encode an AMQP uuid from its 16 big-endian bytes."""
    return b"\x98" + raw


def enc_string(text: str) -> bytes:
    """Encode an AMQP string."""
    raw = text.encode("utf-8")
    if len(raw) < 256:
        return bytes((0xA1, len(raw))) + raw
    return b"\xb1" + _U32.pack(len(raw)) + raw


def enc_uint(value: int) -> bytes:
    """Encode an AMQP uint in its four-byte form."""
    return b"\x70" + _U32.pack(value)


def encode_header(durable: bool | None, priority: int | None, ttl_ms: int | None, delivery_count: int) -> bytes:
    """Encode a header section; first-acquirer is left null."""
    fields = (
        (b"\x40" if durable is None else (b"\x41" if durable else b"\x42"))
        + (b"\x40" if priority is None else bytes((0x50, priority & 0xFF)))
        + (b"\x40" if ttl_ms is None else enc_uint(ttl_ms))
        + b"\x40"
        + enc_uint(delivery_count)
    )
    return b"\x00\x53\x70\xc0" + bytes((len(fields) + 1, 5)) + fields


def encode_map_section(code: int, count: int, pairs: bytes) -> bytes:
    """Encode a map-valued section (annotations, application properties) from raw pairs."""
    return b"\x00\x53" + bytes((code,)) + b"\xd1" + _U32.pack(len(pairs) + 4) + _U32.pack(count) + pairs


def symbol_keys(mapping: dict[str, Any]) -> dict[symbol, Any]:
    """Turn string keys into AMQP symbols, as annotation maps require."""
    return {symbol(k): v for k, v in mapping.items()}
