"""Stored messages: the client's sections kept as bytes, plus the broker's per-message state."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any  # AMQP values as proton decodes them (any of its types), from a client's frames

from proton import symbol

from . import codec

STATE_ACTIVE = 0
STATE_DEFERRED = 1
STATE_SCHEDULED = 2

# Annotations the broker owns; a client-supplied copy (e.g. a replayed received message) is dropped
# so the values a receiver sees are always the broker's.
_BROKER_ANNOTATIONS = frozenset(
    {
        "x-opt-sequence-number",
        "x-opt-enqueue-sequence-number",
        "x-opt-enqueued-time",
        "x-opt-locked-until",
        "x-opt-lock-token",
        "x-opt-message-state",
        "x-opt-deadletter-source",
    }
)
_SCHEDULED = "x-opt-scheduled-enqueue-time"

_K_SEQ = codec.sym_key(b"x-opt-sequence-number")
_K_ENQ_SEQ = codec.sym_key(b"x-opt-enqueue-sequence-number")
_K_ENQ_TIME = codec.sym_key(b"x-opt-enqueued-time")
_K_LOCKED_UNTIL = codec.sym_key(b"x-opt-locked-until")
_K_LOCK_TOKEN = codec.sym_key(b"x-opt-lock-token")
_K_STATE = codec.sym_key(b"x-opt-message-state")
_K_DL_SOURCE = codec.sym_key(b"x-opt-deadletter-source")
_Q = struct.Struct(">q")


def tag_to_uuid_bytes(tag: bytes) -> bytes:
    """Turn a delivery tag (the lock token's little-endian UUID bytes) into big-endian UUID bytes.

    The SDK reads the lock token from the delivery tag with ``uuid.UUID(bytes_le=tag)`` but sends it
    back in management requests as an AMQP uuid, which is big-endian.
    """
    return tag[3::-1] + tag[5:3:-1] + tag[7:5:-1] + tag[8:]


class StoredMessage:
    """One message in one entity. Fan-out copies share the immutable byte sections."""

    __slots__ = (
        "_app",
        "_props",
        "app_raw",
        "body_raw",
        "dead_letter_source",
        "delivery_count",
        "durable",
        "enqueued_ms",
        "expires_ms",
        "lock_tag",
        "locked_until_ms",
        "ma_count",
        "ma_pairs",
        "priority",
        "props_raw",
        "scheduled_ms",
        "seq",
        "state",
        "ttl_ms",
    )

    def __init__(self) -> None:
        self.seq = 0
        self.enqueued_ms = 0
        self.durable: bool | None = None
        self.priority: int | None = None
        self.ttl_ms: int | None = None
        self.ma_count = 0
        self.ma_pairs = b""
        self.props_raw = b""
        self.app_raw = b""
        self.body_raw = b""
        self.delivery_count = 0
        self.expires_ms: int | None = None
        self.state = STATE_ACTIVE
        self.lock_tag: bytes | None = None
        self.locked_until_ms = 0
        self.dead_letter_source: str | None = None
        self.scheduled_ms: int | None = None
        self._app: dict[str, Any] | None = None
        self._props: list[Any] | None = None

    def copy(self) -> StoredMessage:
        """A copy for another subscription, sharing the byte sections."""
        other = StoredMessage()
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    @property
    def application_properties(self) -> Mapping[str, Any]:
        """The decoded application properties (decoded once, on first use)."""
        if self._app is None:
            if self.app_raw:
                value = codec.section_value(self.app_raw)
                self._app = {str(k): v for k, v in dict(value or {}).items()}
            else:
                self._app = {}
        return self._app

    def _properties(self) -> list[Any]:
        if self._props is None:
            self._props = list(codec.section_value(self.props_raw) or []) if self.props_raw else []
        return self._props

    def system_property(self, index: int) -> Any:
        """The AMQP properties-list field at ``index`` (0 = message-id)."""
        props = self._properties()
        return props[index] if index < len(props) else None

    @property
    def message_id(self) -> Any:
        """The message-id property, or ``None``."""
        return self.system_property(0)

    def set_application_properties(self, updates: Mapping[str, Any]) -> None:
        """Merge ``updates`` into the application properties (used when dead-lettering)."""
        merged = dict(self.application_properties)
        merged.update(updates)
        self._app = merged
        self.app_raw = codec.encode_section(codec.APPLICATION_PROPERTIES, merged)

    def encode(self, lock_tag: bytes | None) -> bytes:
        """Encode the message as the broker delivers it, with the broker's annotations."""
        pairs = [
            self.ma_pairs,
            _K_SEQ,
            b"\x81",
            _Q.pack(self.seq),
            _K_ENQ_SEQ,
            b"\x81",
            _Q.pack(self.seq),
            _K_ENQ_TIME,
            b"\x83",
            _Q.pack(self.enqueued_ms),
        ]
        count = self.ma_count + 6
        if lock_tag is not None:
            pairs += (
                _K_LOCKED_UNTIL,
                b"\x83",
                _Q.pack(self.locked_until_ms),
                _K_LOCK_TOKEN,
                b"\x98",
                tag_to_uuid_bytes(lock_tag),
            )
            count += 4
        if self.state != STATE_ACTIVE:
            pairs += (_K_STATE, b"\x81", _Q.pack(self.state))
            count += 2
        if self.dead_letter_source is not None:
            pairs += (_K_DL_SOURCE, codec.enc_string(self.dead_letter_source))
            count += 2
        return b"".join(
            (
                codec.encode_header(self.durable, self.priority, self.ttl_ms, self.delivery_count),
                codec.encode_map_section(codec.MESSAGE_ANNOTATIONS, count, b"".join(pairs)),
                self.props_raw,
                self.app_raw,
                self.body_raw,
            )
        )


def parse_message(raw: bytes) -> StoredMessage:
    """Parse a client's encoded message into a :class:`StoredMessage` (sequence not yet set)."""
    msg = StoredMessage()
    body_start: int | None = None
    for code, start, value_pos, end in codec.split_sections(raw):
        if code == codec.HEADER:
            fields = list(codec.decode_value(raw[value_pos:end]) or [])
            fields += [None] * (5 - len(fields))
            msg.durable = fields[0]
            msg.priority = fields[1]
            msg.ttl_ms = int(fields[2]) if fields[2] else None
        elif code == codec.MESSAGE_ANNOTATIONS:
            _take_annotations(msg, codec.decode_value(raw[value_pos:end]) or {})
        elif code == codec.PROPERTIES:
            msg.props_raw = raw[start:end]
        elif code == codec.APPLICATION_PROPERTIES:
            msg.app_raw = raw[start:end]
        elif code == codec.DELIVERY_ANNOTATIONS:
            continue
        elif body_start is None:
            body_start = start
    if body_start is not None:
        msg.body_raw = raw[body_start:]
    return msg


def _take_annotations(msg: StoredMessage, annotations: dict[Any, Any]) -> None:
    kept: dict[symbol, Any] = {}
    for key, value in annotations.items():
        name = str(key)
        if name == _SCHEDULED and value is not None:
            msg.scheduled_ms = int(value)
            kept[symbol(name)] = value
        elif name not in _BROKER_ANNOTATIONS:
            kept[key if isinstance(key, symbol) else symbol(name)] = value
    if kept:
        msg.ma_count, msg.ma_pairs = codec.map_pairs(codec.encode_value(kept))


def split_batch(raw: bytes) -> list[bytes] | None:
    """Return the inner messages if ``raw`` is the SDK's batch envelope, else ``None``.

    A batch is a message whose body is only data sections, each holding a complete encoded message,
    and which carries no application properties of its own.
    """
    sections = codec.split_sections(raw)
    inner: list[bytes] = []
    for code, _start, value_pos, end in sections:
        if code == codec.DATA:
            payload = codec.data_section_payload(raw, value_pos, end)
            if not codec.looks_like_message(payload):
                return None
            inner.append(payload)
        elif code in (codec.APPLICATION_PROPERTIES, codec.AMQP_VALUE, codec.AMQP_SEQUENCE):
            return None
    return inner or None
