"""The copy replay sends for a dead letter: its deterministic id and the properties that carry its history.

Pure: no SDK. The copy keeps the letter's body, properties and addressing, gets a new message id that
is a function of the letter (so duplicate detection drops a second copy of the same replay, never the
copy as a repeat of the original), and carries the original's message id and enqueued time, from
which the worker derives its event ids and decision time: a replayed request publishes the
original's events byte for byte.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from worker.domain.errors import PermanentError
from worker.service.handling import REPLAY_ORIGINAL_ENQUEUED_TIME, REPLAY_ORIGINAL_MESSAGE_ID, original_enqueued_time

if TYPE_CHECKING:
    from adapters.servicebus.dlq.entity import Entity
    from adapters.servicebus.dlq.letter import DeadLetter

#: Application properties replay adds; a replayed message carries its history with it.
REPLAY_COUNT = "ab_replay_count"
REPLAY_ORIGINAL_REASON = "ab_replay_original_reason"
REPLAY_ORIGINAL_DESCRIPTION = "ab_replay_original_description"
REPLAYED_AT = "ab_replayed_at"
REPLAY_SUBSCRIPTION = "ab_replay_subscription"
REPLAY_SOURCE_SEQUENCE = "ab_replay_source_sequence_number"

_MAX_MESSAGE_ID = 128
_REPLAY_ID_NAMESPACE = uuid.UUID("0b6f6d8e-2c55-5f5e-9a51-3a0d1c7e4b21")


def replay_message_id(original: str, count: int, body: bytes, kind: str = "replay") -> str:
    """The copy's message id: deterministic in (original id, replay count, body, kind), never the original.

    The same dead letter replayed twice at the same count gets the same id, so duplicate detection
    drops the second copy (a copy sent before a lost lock, or a file replay re-run after an
    interruption); a repaired body, a later replay or the other kind (``replay`` from the DLQ,
    ``file-replay`` from an export) gets a new one.
    """
    digest = hashlib.sha256(body).hexdigest()[:12]
    readable = f"{original}/{kind}-{count}-{digest}"
    if len(readable) <= _MAX_MESSAGE_ID:
        return readable
    return f"{kind}-{count}-{uuid.uuid5(_REPLAY_ID_NAMESPACE, f'{original}|{kind}|{count}|{digest}')}"


def original_message_id(letter: DeadLetter, entity: Entity) -> str:
    """The identity the worker gave the request when it was first published (kept across replays).

    The worker names a message by its message id (a binary one as ``0x<hex>``, which is how
    ``letter.message_id`` reads it) and one without a message id by its sequence number,
    ``seq-<n>`` (``adapters.servicebus.convert.message_identity``); a dead letter keeps its
    sequence number, so its copy names the same request and publishes the same event ids.
    """
    recorded = letter.application_properties.get(REPLAY_ORIGINAL_MESSAGE_ID)
    if isinstance(recorded, str) and recorded:
        return recorded
    if letter.message_id:
        return letter.message_id
    # A hand-written line with neither a message id nor a sequence number names no request the worker saw.
    return f"seq-{letter.sequence_number}" if letter.sequence_number else f"{entity}#0"


def original_decision_time(letter: DeadLetter) -> datetime | None:
    """The time a copy of ``letter`` is decided at: the original's enqueued time, kept across replays.

    A letter that is itself a replayed copy carries it already; one whose carried value the worker
    would not believe was never decided with it (the worker dead-letters such a request before
    publishing anything), so its own enqueued time decides instead. ``None`` for an exported letter
    without an enqueued time: the copy is then decided when it is enqueued.
    """
    carried = letter.application_properties.get(REPLAY_ORIGINAL_ENQUEUED_TIME)
    if carried is not None:
        try:
            return original_enqueued_time(carried, letter.enqueued_time)
        except PermanentError:
            pass
    return letter.enqueued_time


@dataclass(frozen=True, slots=True)
class ReplayCopy:
    """The message replay sends for one dead letter, in the SDK message's terms (its keyword arguments)."""

    body: bytes
    message_id: str
    application_properties: dict[str | bytes, Any]
    correlation_id: str | None
    content_type: str | None
    subject: str | None
    reply_to: str | None
    reply_to_session_id: str | None
    session_id: str | None
    to: str | None
    partition_key: str | None
    time_to_live: timedelta | None


def replay_copy(letter: DeadLetter, entity: Entity, now: datetime | None = None, *, kind: str = "replay") -> ReplayCopy:
    """The resubmitted copy: same body, properties and addressing, plus replay metadata; a new id.

    The metadata includes the original's message id and enqueued time, from which the worker
    derives the event id and the decision time: a copy's events are byte-identical to the original's.
    """
    count = letter.replay_count + 1
    original = original_message_id(letter, entity)
    properties: dict[str | bytes, Any] = dict(letter.application_properties.items())
    properties[REPLAY_COUNT] = count
    properties[REPLAY_ORIGINAL_MESSAGE_ID] = original
    decided = original_decision_time(letter)
    if decided is not None:
        # A hand-written export may give a time without an offset: it is UTC, as everything here is.
        utc = decided.astimezone(UTC) if decided.tzinfo else decided.replace(tzinfo=UTC)
        properties[REPLAY_ORIGINAL_ENQUEUED_TIME] = utc.isoformat()
    else:
        properties.pop(REPLAY_ORIGINAL_ENQUEUED_TIME, None)
    properties[REPLAY_ORIGINAL_REASON] = letter.reason
    properties[REPLAY_ORIGINAL_DESCRIPTION] = letter.description[:512]
    properties[REPLAYED_AT] = (now or datetime.now(UTC)).isoformat()
    if letter.sequence_number:
        properties[REPLAY_SOURCE_SEQUENCE] = letter.sequence_number
    if entity.subscription:
        properties[REPLAY_SUBSCRIPTION] = entity.subscription
    return ReplayCopy(
        body=letter.body,
        message_id=replay_message_id(original, count, letter.body, kind),
        application_properties=properties,
        correlation_id=letter.correlation_id,
        content_type=letter.content_type,
        subject=letter.subject,
        reply_to=letter.reply_to,
        reply_to_session_id=letter.reply_to_session_id,
        session_id=letter.session_id,
        to=letter.to,
        partition_key=letter.partition_key,
        time_to_live=timedelta(seconds=letter.time_to_live) if letter.time_to_live else None,
    )
