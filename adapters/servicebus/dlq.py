"""Dead-letter operations on Service Bus: peek, export and replay, through the real SDK.

Replay is loss-free by construction: each dead-lettered message is resubmitted first and completed
in the dead-letter queue only after the broker accepted the copy. An interruption at any point
leaves every message in the DLQ, on the queue, or (harmlessly, since assignment is deterministic and
events carry deterministic ids) in both.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusReceiver,
    ServiceBusSubQueue,
)

from adapters.files import body_fields
from adapters.servicebus import message_body

log = logging.getLogger(__name__)

#: Application properties replay adds; a replayed message carries its history with it.
REPLAY_COUNT = "ab_replay_count"
REPLAY_ORIGINAL_REASON = "ab_replay_original_reason"
REPLAY_ORIGINAL_DESCRIPTION = "ab_replay_original_description"
REPLAYED_AT = "ab_replayed_at"
REPLAY_SUBSCRIPTION = "ab_replay_subscription"


@dataclass(frozen=True, slots=True)
class Entity:
    """A queue, or a topic subscription (``topic/Subscriptions/name``), whose DLQ we operate on."""

    queue: str | None = None
    topic: str | None = None
    subscription: str | None = None

    @classmethod
    def parse(cls, text: str) -> Entity:
        """``queue`` or ``topic/Subscriptions/sub`` (also ``topic/sub``)."""
        parts = [p for p in text.split("/") if p]
        if len(parts) == 1:
            return cls(queue=parts[0])
        if len(parts) == 3 and parts[1].lower() == "subscriptions":
            return cls(topic=parts[0], subscription=parts[2])
        if len(parts) == 2:
            return cls(topic=parts[0], subscription=parts[1])
        raise ValueError(f"entity {text!r}: expected QUEUE or TOPIC/Subscriptions/SUBSCRIPTION")

    def __str__(self) -> str:
        return self.queue or f"{self.topic}/Subscriptions/{self.subscription}"

    def dlq_receiver(self, client: ServiceBusClient, mode: ServiceBusReceiveMode) -> ServiceBusReceiver:
        """A receiver on this entity's dead-letter sub-queue."""
        if self.queue:
            return client.get_queue_receiver(self.queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER, receive_mode=mode)
        if not (self.topic and self.subscription):
            raise ValueError(f"entity {self}: neither a queue nor a topic subscription")
        return client.get_subscription_receiver(
            self.topic, self.subscription, sub_queue=ServiceBusSubQueue.DEAD_LETTER, receive_mode=mode
        )


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _properties(message: ServiceBusReceivedMessage) -> dict[str, Any]:
    return {
        str(_text(k)): _text(v)
        for k, v in (message.application_properties or {}).items()
        if _text(k) not in {"DeadLetterReason", "DeadLetterErrorDescription"}
    }


@dataclass
class DeadLetter:
    """One dead-lettered message, decoded for people and files."""

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

    @classmethod
    def from_message(cls, message: ServiceBusReceivedMessage) -> DeadLetter:
        """Decode a received DLQ message."""
        return cls(
            sequence_number=message.sequence_number or 0,
            enqueued_time=message.enqueued_time_utc,
            delivery_count=message.delivery_count or 0,
            reason=message.dead_letter_reason or "",
            description=message.dead_letter_error_description or "",
            message_id=str(message.message_id) if message.message_id is not None else None,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            body=message_body(message),
            application_properties=_properties(message),
        )

    @property
    def request(self) -> Mapping[str, Any]:
        """The body as a JSON object, or empty when it is not one."""
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
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
        """The export format (JSON lines): body as text when UTF-8, else base64."""
        return {
            "sequence_number": self.sequence_number,
            "enqueued_time": self.enqueued_time.isoformat() if self.enqueued_time else None,
            "delivery_count": self.delivery_count,
            "dead_letter_reason": self.reason,
            "dead_letter_error_description": self.description,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "content_type": self.content_type,
            "application_properties": self.application_properties,
            **body_fields(self.body),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeadLetter:
        """Read one exported line back (for ``dlq replay --from``); raises ``ValueError`` naming the field."""
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
        return cls(
            sequence_number=int(data.get("sequence_number") or 0),
            enqueued_time=datetime.fromisoformat(enqueued) if enqueued else None,
            delivery_count=int(data.get("delivery_count") or 0),
            reason=str(data.get("dead_letter_reason") or ""),
            description=str(data.get("dead_letter_error_description") or ""),
            message_id=data.get("message_id"),
            correlation_id=data.get("correlation_id"),
            content_type=data.get("content_type"),
            body=body,
            application_properties=dict(properties),
        )


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to act on."""

    reason: str | None = None
    experiment: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, letter: DeadLetter) -> bool:
        """True when the letter passes every given criterion."""
        if self.reason and letter.reason != self.reason:
            return False
        if self.experiment and letter.request.get("experiment_id") != self.experiment:
            return False
        when = letter.enqueued_time
        if self.since and (when is None or when < self.since):
            return False
        return not (self.until and (when is None or when > self.until))


def peek(client: ServiceBusClient, entity: Entity, limit: int = 1000) -> list[DeadLetter]:
    """Dead letters without changing them (browse by sequence number)."""
    letters: list[DeadLetter] = []
    with entity.dlq_receiver(client, ServiceBusReceiveMode.PEEK_LOCK) as receiver:
        sequence = 0
        while len(letters) < limit:
            batch = receiver.peek_messages(max_message_count=min(250, limit - len(letters)), sequence_number=sequence)
            if not batch:
                break
            letters.extend(DeadLetter.from_message(m) for m in batch)
            sequence = max(m.sequence_number or 0 for m in batch) + 1
    return letters


@dataclass
class ReplayOutcome:
    """What a replay did (or, with ``dry_run``, would do)."""

    replayed: list[DeadLetter] = field(default_factory=list)
    skipped_too_many: list[DeadLetter] = field(default_factory=list)
    not_matching: int = 0


def replay_message(letter: DeadLetter, entity: Entity, now: datetime | None = None) -> ServiceBusMessage:
    """The resubmitted copy: same body and properties, plus replay metadata; same message id."""
    properties: dict[str | bytes, Any] = dict(letter.application_properties.items())
    properties[REPLAY_COUNT] = letter.replay_count + 1
    properties[REPLAY_ORIGINAL_REASON] = letter.reason
    properties[REPLAY_ORIGINAL_DESCRIPTION] = letter.description[:512]
    properties[REPLAYED_AT] = (now or datetime.now(UTC)).isoformat()
    if entity.subscription:
        properties[REPLAY_SUBSCRIPTION] = entity.subscription
    return ServiceBusMessage(
        body=letter.body,
        message_id=letter.message_id,
        correlation_id=letter.correlation_id,
        content_type=letter.content_type,
        application_properties=properties,
    )


def _target_sender(client: ServiceBusClient, entity: Entity) -> Any:
    # A subscription's dead letters go back through its topic, tagged with the subscription, since
    # Service Bus cannot send to one subscription; see the README for the matching rule.
    if entity.queue:
        return client.get_queue_sender(entity.queue)
    if not entity.topic:
        raise ValueError(f"entity {entity}: neither a queue nor a topic subscription")
    return client.get_topic_sender(entity.topic)


def replay(
    client: ServiceBusClient,
    entity: Entity,
    selection: ReplayFilter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    max_replays: int = 5,
    rate: float | None = None,
    on_progress: Callable[[DeadLetter, str], None] | None = None,
) -> ReplayOutcome:
    """Move matching dead letters back to their entity: resubmit, then complete the DLQ copy."""
    outcome = ReplayOutcome()
    if dry_run:
        for letter in peek(client, entity, limit=10_000):
            _classify(letter, selection, max_replays, outcome, limit)
        return outcome
    seen: set[int] = set()
    interval = 1.0 / rate if rate else 0.0
    with (
        entity.dlq_receiver(client, ServiceBusReceiveMode.PEEK_LOCK) as receiver,
        _target_sender(client, entity) as sender,
    ):
        for message in _drain(receiver, seen):
            letter = DeadLetter.from_message(message)
            verdict = _classify(letter, selection, max_replays, outcome, limit)
            if verdict != "replay":
                # Leave it in the DLQ untouched (abandon only releases our lock).
                receiver.abandon_message(message)
                if verdict == "limit":
                    break
                continue
            sender.send_messages(replay_message(letter, entity))
            receiver.complete_message(message)
            if on_progress is not None:
                on_progress(letter, "replayed")
            if interval:
                time.sleep(interval)
    return outcome


def _classify(
    letter: DeadLetter, selection: ReplayFilter, max_replays: int, outcome: ReplayOutcome, limit: int | None
) -> str:
    if not selection.matches(letter):
        outcome.not_matching += 1
        return "skip"
    if letter.replay_count >= max_replays:
        log.warning(
            "Skipping message %s (sequence %d): already replayed %d times (limit %d); fix it by hand or export it",
            letter.message_id,
            letter.sequence_number,
            letter.replay_count,
            max_replays,
        )
        outcome.skipped_too_many.append(letter)
        return "skip"
    if limit is not None and len(outcome.replayed) >= limit:
        return "limit"
    outcome.replayed.append(letter)
    return "replay"


def _drain(receiver: ServiceBusReceiver, seen: set[int]) -> Iterator[ServiceBusReceivedMessage]:
    """Each DLQ message once: stop when a batch brings nothing new (abandoned ones come back)."""
    while True:
        batch = receiver.receive_messages(max_message_count=100, max_wait_time=2)
        fresh = [m for m in batch if (m.sequence_number or 0) not in seen]
        for message in batch:
            if (message.sequence_number or 0) in seen:
                receiver.abandon_message(message)
        if not fresh:
            return
        for message in fresh:
            seen.add(message.sequence_number or 0)
            yield message


def replay_from_file(
    client: ServiceBusClient, entity: Entity, letters: Sequence[DeadLetter], *, rate: float | None = None
) -> int:
    """Resubmit exported (possibly hand-repaired) dead letters; returns how many were sent."""
    interval = 1.0 / rate if rate else 0.0
    with _target_sender(client, entity) as sender:
        for letter in letters:
            sender.send_messages(replay_message(letter, entity))
            if interval:
                time.sleep(interval)
    return len(letters)
