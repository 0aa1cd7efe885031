"""A dead letter as people and files see it: the model, its reasons, and the export format (JSON lines).

Pure: no SDK. ``dlq export`` writes :meth:`DeadLetter.to_json`; ``dlq replay --from`` and
``dlq purge --from`` read it back with :meth:`DeadLetter.from_json`, naming the field that is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.files import body_fields
from adapters.servicebus.dlq.replay_copy import REPLAY_COUNT
from worker.domain.errors import DeadLetterReason

#: The reason ``queue dead-letter`` writes unless told otherwise.
OPERATOR_REASON = "DeadLetteredByOperator"
#: Reasons Service Bus itself writes.
BROKER_REASONS = (
    "MaxDeliveryCountExceeded",
    "TTLExpiredException",
    "HeaderSizeExceeded",
    "MaxTransferHopCountExceeded",
    "Session id is null.",
)
#: Every reason a dead letter of ours can carry; ``--reason`` outside these (and outside the
#: reasons actually present in the DLQ) is a typo.
KNOWN_REASONS: tuple[str, ...] = (*(r.value for r in DeadLetterReason), *BROKER_REASONS, OPERATOR_REASON)


@dataclass
class DeadLetter:
    """One dead-lettered (or, for ``queue peek``, active) message, decoded for people and files."""

    sequence_number: int
    enqueued_time: datetime | None
    delivery_count: int
    reason: str
    description: str
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    body: bytes
    application_properties: dict[str, Any] = field(default_factory=dict)
    subject: str | None = None
    reply_to: str | None = None
    reply_to_session_id: str | None = None
    session_id: str | None = None
    to: str | None = None
    partition_key: str | None = None
    time_to_live: float | None = None
    #: Read from a file: the SHA-256 of the body as ``dlq export`` wrote it (a repaired line keeps it).
    exported_sha256: str | None = None

    @property
    def body_sha256(self) -> str:
        """The SHA-256 of the body, in hex: what ``dlq purge --from`` recognises a dead letter's body by."""
        return hashlib.sha256(self.body).hexdigest()

    @property
    def request(self) -> Mapping[str, Any]:
        """The body as a JSON object, or empty when it is not one."""
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def replay_count(self) -> int:
        """How many times this message was replayed before."""
        try:
            return int(self.application_properties.get(REPLAY_COUNT, 0))
        except (TypeError, ValueError):
            return 0

    def to_json(self) -> dict[str, Any]:
        """The export format (JSON lines): body as text when UTF-8, else base64, and the body's digest.

        ``body_sha256`` is the digest of the body as exported: repairing the body in the file leaves it
        naming the original, so ``dlq purge --from`` removes a dead letter only if it is the one exported.
        """
        return {
            "sequence_number": self.sequence_number,
            "enqueued_time": self.enqueued_time.isoformat() if self.enqueued_time else None,
            "delivery_count": self.delivery_count,
            "dead_letter_reason": self.reason,
            "dead_letter_error_description": self.description,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "content_type": self.content_type,
            "subject": self.subject,
            "reply_to": self.reply_to,
            "reply_to_session_id": self.reply_to_session_id,
            "session_id": self.session_id,
            "to": self.to,
            "partition_key": self.partition_key,
            "time_to_live_seconds": self.time_to_live,
            "application_properties": self.application_properties,
            **body_fields(self.body),
            "body_sha256": self.body_sha256,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeadLetter:
        """Read one exported line back (``dlq replay --from``, ``dlq purge --from``); ``ValueError`` names the field."""
        if "body" in data:
            if not isinstance(data["body"], str):
                raise ValueError("field 'body' must be a string")
            body = data["body"].encode("utf-8")
        elif "body_base64" in data:
            body = base64.b64decode(data["body_base64"], validate=True)
        else:
            raise ValueError("missing field 'body' (or 'body_base64')")
        properties = data.get("application_properties") or {}
        if not isinstance(properties, dict):
            raise ValueError("field 'application_properties' must be an object")
        enqueued = data.get("enqueued_time")
        ttl = data.get("time_to_live_seconds")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0):
            raise ValueError("field 'time_to_live_seconds' must be a positive number")
        digest = data.get("body_sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise ValueError("field 'body_sha256' must be 64 hexadecimal digits (as dlq export wrote it)")
        return cls(
            sequence_number=int(data.get("sequence_number") or 0),
            enqueued_time=datetime.fromisoformat(enqueued) if enqueued else None,
            delivery_count=int(data.get("delivery_count") or 0),
            reason=str(data.get("dead_letter_reason") or ""),
            description=str(data.get("dead_letter_error_description") or ""),
            body=body,
            application_properties=dict(properties),
            time_to_live=float(ttl) if ttl is not None else None,
            exported_sha256=digest.lower() if digest else None,
            **{name: _field_text(data, name) for name in _TEXT_FIELDS},
        )


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

_TEXT_FIELDS = (
    "message_id",
    "correlation_id",
    "content_type",
    "subject",
    "reply_to",
    "reply_to_session_id",
    "session_id",
    "to",
    "partition_key",
)


def _field_text(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"field {name!r} must be a string")
