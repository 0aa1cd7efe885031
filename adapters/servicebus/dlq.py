"""Dead-letter (and active-queue) operations on Service Bus, through the real SDK.

Every command first *browses* the whole entity by sequence number (peek: no lock, no delivery
count), so it knows every match wherever it sits. Commands that change something then receive in
PEEK_LOCK and **hold** every message they do not act on, under renewed locks, until they have
reached every match; only then are the held messages released (abandoned). Held messages cannot be
received again, so a scan never stops early on messages that come back to the head, never sees one
dead letter twice, and raises another dead letter's delivery count at most once per run.

Replay is loss-free by construction: each copy is sent first and the dead letter completed only
after the broker accepted the copy. The copy carries a new, deterministic message id (the original
id, the replay count and a digest of the body), so the entity's duplicate detection cannot drop it
as a repeat of the original, while a second copy of the *same* replay (after a lost lock) is dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusReceiver,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import MessageSizeExceededError, ServiceBusError

from adapters.files import body_fields
from adapters.servicebus import LockKeeper, message_body
from worker.domain.errors import DeadLetterReason
from worker.service.handling import REPLAY_ORIGINAL_MESSAGE_ID

log = logging.getLogger(__name__)

#: Application properties replay adds; a replayed message carries its history with it.
REPLAY_COUNT = "ab_replay_count"
REPLAY_ORIGINAL_REASON = "ab_replay_original_reason"
REPLAY_ORIGINAL_DESCRIPTION = "ab_replay_original_description"
REPLAYED_AT = "ab_replayed_at"
REPLAY_SUBSCRIPTION = "ab_replay_subscription"
REPLAY_SOURCE_SEQUENCE = "ab_replay_source_sequence_number"

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

_MAX_MESSAGE_ID = 128
_REPLAY_ID_NAMESPACE = uuid.UUID("0b6f6d8e-2c55-5f5e-9a51-3a0d1c7e4b21")
_PAGE = 250
_EMPTY_ROUNDS = 2


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

    def receiver(
        self, client: ServiceBusClient, mode: ServiceBusReceiveMode, *, dead_letter: bool = True
    ) -> ServiceBusReceiver:
        """A receiver on this entity's dead-letter sub-queue (or, with ``dead_letter=False``, itself)."""
        sub_queue = ServiceBusSubQueue.DEAD_LETTER if dead_letter else None
        if self.queue:
            return client.get_queue_receiver(self.queue, sub_queue=sub_queue, receive_mode=mode)
        if not (self.topic and self.subscription):
            raise ValueError(f"entity {self}: neither a queue nor a topic subscription")
        return client.get_subscription_receiver(self.topic, self.subscription, sub_queue=sub_queue, receive_mode=mode)


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(_text(value))


def _properties(message: ServiceBusReceivedMessage) -> dict[str, Any]:
    return {
        str(_text(k)): _text(v)
        for k, v in (message.application_properties or {}).items()
        if _text(k) not in {"DeadLetterReason", "DeadLetterErrorDescription"}
    }


def _body(message: ServiceBusReceivedMessage) -> bytes:
    # A dead letter is often there because its body is odd (an AMQP map with non-text keys, say):
    # the tools must still list, export and replay it rather than crash on it.
    try:
        return message_body(message)
    except (TypeError, ValueError, RecursionError):
        return repr(message.body).encode("utf-8", "replace")


def _seconds(value: Any) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return None


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

    @classmethod
    def from_message(cls, message: ServiceBusReceivedMessage) -> DeadLetter:
        """Decode a received or peeked message."""
        return cls(
            sequence_number=message.sequence_number or 0,
            enqueued_time=message.enqueued_time_utc,
            delivery_count=message.delivery_count or 0,
            reason=_optional_text(message.dead_letter_reason) or "",
            description=_optional_text(message.dead_letter_error_description) or "",
            message_id=_optional_text(message.message_id),
            correlation_id=_optional_text(message.correlation_id),
            content_type=_optional_text(message.content_type),
            body=_body(message),
            application_properties=_properties(message),
            subject=_optional_text(message.subject),
            reply_to=_optional_text(message.reply_to),
            reply_to_session_id=_optional_text(message.reply_to_session_id),
            session_id=_optional_text(message.session_id),
            to=_optional_text(message.to),
            partition_key=_optional_text(message.partition_key),
            time_to_live=_seconds(message.time_to_live),
        )

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
            "subject": self.subject,
            "reply_to": self.reply_to,
            "reply_to_session_id": self.reply_to_session_id,
            "session_id": self.session_id,
            "to": self.to,
            "partition_key": self.partition_key,
            "time_to_live_seconds": self.time_to_live,
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
        ttl = data.get("time_to_live_seconds")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0):
            raise ValueError("field 'time_to_live_seconds' must be a positive number")
        return cls(
            sequence_number=int(data.get("sequence_number") or 0),
            enqueued_time=datetime.fromisoformat(enqueued) if enqueued else None,
            delivery_count=int(data.get("delivery_count") or 0),
            reason=str(data.get("dead_letter_reason") or ""),
            description=str(data.get("dead_letter_error_description") or ""),
            body=body,
            application_properties=dict(properties),
            time_to_live=float(ttl) if ttl is not None else None,
            **{name: _field_text(data, name) for name in _TEXT_FIELDS},
        )


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


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to act on."""

    reason: str | None = None
    experiment: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def is_empty(self) -> bool:
        """True when it matches everything."""
        return not (self.reason or self.experiment or self.since or self.until)

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


def browse(client: ServiceBusClient, entity: Entity, *, dead_letter: bool = True) -> Iterator[DeadLetter]:
    """Every message of the DLQ (or the entity itself), in sequence order, without changing any."""
    with entity.receiver(client, ServiceBusReceiveMode.PEEK_LOCK, dead_letter=dead_letter) as receiver:
        sequence = 0
        while True:
            batch = receiver.peek_messages(max_message_count=_PAGE, sequence_number=sequence)
            if not batch:
                return
            for message in batch:
                yield DeadLetter.from_message(message)
            sequence = max(m.sequence_number or 0 for m in batch) + 1


def peek(client: ServiceBusClient, entity: Entity, limit: int | None = None) -> list[DeadLetter]:
    """Dead letters without changing them: all of them, or the first ``limit``."""
    letters: list[DeadLetter] = []
    for letter in browse(client, entity):
        if limit is not None and len(letters) >= limit:
            break
        letters.append(letter)
    return letters


# -- the replay copy ------------------------------------------------------------------------------


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
    """The message id the request was first published with (kept across replays)."""
    recorded = letter.application_properties.get(REPLAY_ORIGINAL_MESSAGE_ID)
    if isinstance(recorded, str) and recorded:
        return recorded
    return letter.message_id or f"{entity}#{letter.sequence_number}"


def replay_message(
    letter: DeadLetter, entity: Entity, now: datetime | None = None, *, kind: str = "replay"
) -> ServiceBusMessage:
    """The resubmitted copy: same body, properties and addressing, plus replay metadata; a new id."""
    count = letter.replay_count + 1
    original = original_message_id(letter, entity)
    properties: dict[str | bytes, Any] = dict(letter.application_properties.items())
    properties[REPLAY_COUNT] = count
    properties[REPLAY_ORIGINAL_MESSAGE_ID] = original
    properties[REPLAY_ORIGINAL_REASON] = letter.reason
    properties[REPLAY_ORIGINAL_DESCRIPTION] = letter.description[:512]
    properties[REPLAYED_AT] = (now or datetime.now(UTC)).isoformat()
    if letter.sequence_number:
        properties[REPLAY_SOURCE_SEQUENCE] = letter.sequence_number
    if entity.subscription:
        properties[REPLAY_SUBSCRIPTION] = entity.subscription
    return ServiceBusMessage(
        body=letter.body,
        message_id=replay_message_id(original, count, letter.body, kind),
        correlation_id=letter.correlation_id,
        content_type=letter.content_type,
        subject=letter.subject,
        reply_to=letter.reply_to,
        reply_to_session_id=letter.reply_to_session_id,
        session_id=letter.session_id,
        to=letter.to,
        partition_key=letter.partition_key,
        time_to_live=timedelta(seconds=letter.time_to_live) if letter.time_to_live else None,
        application_properties=properties,
    )


def _target_sender(client: ServiceBusClient, entity: Entity) -> Any:
    # A subscription's dead letters go back through its topic, tagged with the subscription, since
    # Service Bus cannot send to one subscription; docs/operations.md gives the subscription rule.
    if entity.queue:
        return client.get_queue_sender(entity.queue)
    if not entity.topic:
        raise ValueError(f"entity {entity}: neither a queue nor a topic subscription")
    return client.get_topic_sender(entity.topic)


# -- selection: browse everything, decide up front ------------------------------------------------

SKIP_TOO_MANY = "replayed --max-replays times already"
SKIP_LIMIT = "over --limit (left for a later run)"
SKIP_NOT_RECEIVED = "not received: settled meanwhile or locked by another receiver"
SKIP_LOCK_LOST = "lock lost before it could be settled; still there"


@dataclass
class Selection:
    """What a browse found: the targets to act on, in sequence order, and everything else counted."""

    scanned: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    matched: list[DeadLetter] = field(default_factory=list)
    targets: list[DeadLetter] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)

    @property
    def not_matching(self) -> int:
        """Browsed but outside the filter."""
        return self.scanned - len(self.matched)


def select(
    client: ServiceBusClient,
    entity: Entity,
    selection: ReplayFilter,
    *,
    max_replays: int | None = None,
    limit: int | None = None,
    dead_letter: bool = True,
) -> Selection:
    """Browse the whole DLQ and decide which letters to act on (never capped silently)."""
    found = Selection()
    for letter in browse(client, entity, dead_letter=dead_letter):
        found.scanned += 1
        found.reasons[letter.reason] += 1
        if not selection.matches(letter):
            continue
        found.matched.append(letter)
        if max_replays is not None and letter.replay_count >= max_replays:
            log.warning(
                "Skipping message %s (sequence %d): already replayed %d times (limit %d); fix it by hand or export it",
                letter.message_id,
                letter.sequence_number,
                letter.replay_count,
                max_replays,
            )
            found.skipped.append((letter, SKIP_TOO_MANY))
        elif limit is not None and len(found.targets) >= limit:
            found.skipped.append((letter, SKIP_LIMIT))
        else:
            found.targets.append(letter)
    return found


# -- acting: receive, hold what is not ours, release at the end -----------------------------------

#: Settles one received target; returns ``None`` when done, or why it was skipped.
Action = Callable[[ServiceBusReceiver, ServiceBusReceivedMessage], str | None]


@dataclass
class Outcome:
    """What a command did (or, with a dry run, would do)."""

    selection: Selection
    done: list[DeadLetter] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)
    released: int = 0
    cancelled: bool = False

    @property
    def replayed(self) -> list[DeadLetter]:
        """The letters acted on (replayed, purged or dead-lettered)."""
        return self.done

    @property
    def not_matching(self) -> int:
        """Browsed but outside the filter."""
        return self.selection.not_matching


@dataclass
class _HoldingScan:
    """Receives until every target was reached, holding (under renewed locks) whatever it passes."""

    act: Action
    outcome: Outcome
    keeper: LockKeeper
    pending: dict[int, DeadLetter]
    interval: float = 0.0
    on_progress: Callable[[DeadLetter, str], None] | None = None
    held: dict[int, ServiceBusReceivedMessage] = field(default_factory=dict)

    def run(self, receiver: ServiceBusReceiver, max_wait: float) -> None:
        """Receive batches until no target is pending, or twice nothing more can be received."""
        misses = 0
        undecided: dict[int, ServiceBusReceivedMessage] = {}
        try:
            while self.pending and misses < _EMPTY_ROUNDS:
                batch = receiver.receive_messages(
                    max_message_count=min(100, max(len(self.pending), 10)), max_wait_time=max_wait
                )
                # An empty batch means everything receivable is held: a pending target was settled
                # or is locked elsewhere. A second empty round guards against a spurious one.
                misses = 0 if batch else misses + 1
                self.keeper.hold(receiver, batch)
                # Until decided, a message is released if the run ends early (a refused copy raises):
                # a retry can then take it at once instead of waiting out its lock.
                undecided = {m.sequence_number or 0: m for m in batch}
                for message in batch:
                    self._take(receiver, message)
                    undecided.pop(message.sequence_number or 0)
        finally:
            self.outcome.released = _release(receiver, self.keeper, {**undecided, **self.held})
        self.outcome.skipped.extend((letter, SKIP_NOT_RECEIVED) for letter in self.pending.values())

    def _take(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> None:
        seq = message.sequence_number or 0
        if self.pending.pop(seq, None) is None:
            # Not ours (or a copy that came back meanwhile): keep it locked so it cannot come
            # round again, and release it at the end.
            self.held[seq] = message
            return
        letter = DeadLetter.from_message(message)
        why = _settle_target(self.act, receiver, message)
        self.keeper.release(message)
        if why is None:
            self.outcome.done.append(letter)
        else:
            self.outcome.skipped.append((letter, why))
            self.held[seq] = message
        if self.on_progress is not None:
            self.on_progress(letter, why or "done")
        if self.interval:
            time.sleep(self.interval)


def _act_on_targets(
    client: ServiceBusClient,
    entity: Entity,
    found: Selection,
    outcome: Outcome,
    act: Action,
    *,
    dead_letter: bool = True,
    rate: float | None = None,
    on_progress: Callable[[DeadLetter, str], None] | None = None,
    max_wait: float = 2.0,
    keeper: LockKeeper | None = None,
) -> None:
    pending = {letter.sequence_number: letter for letter in found.targets}
    scan = _HoldingScan(act, outcome, keeper or LockKeeper(), pending, 1.0 / rate if rate else 0.0, on_progress)
    try:
        with entity.receiver(client, ServiceBusReceiveMode.PEEK_LOCK, dead_letter=dead_letter) as receiver:
            scan.run(receiver, max_wait)
    finally:
        if keeper is None:
            scan.keeper.close()


def _settle_target(act: Action, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
    try:
        return act(receiver, message)
    except MessageSizeExceededError as exc:
        return f"copy refused as too large: {exc}"


def _release(receiver: ServiceBusReceiver, keeper: LockKeeper, held: Mapping[int, ServiceBusReceivedMessage]) -> int:
    released = 0
    for message in held.values():
        keeper.release(message)
        try:
            receiver.abandon_message(message)
            released += 1
        except (ServiceBusError, ValueError) as exc:
            # Already settled (a skipped target) or the lock ran out: it is back on the queue anyway.
            log.debug("release of sequence %s: %s", message.sequence_number, exc)
    return released


def _complete_after(action: Callable[[], None], receiver: ServiceBusReceiver, message: Any) -> str | None:
    action()
    try:
        receiver.complete_message(message)
    except ServiceBusError:
        return (
            "copy sent, but the dead letter could not be completed (lock lost) and stays; a later replay "
            "sends the same message id, which duplicate detection drops"
        )
    return None


# -- the commands ---------------------------------------------------------------------------------


def _go_ahead(found: Selection, outcome: Outcome, dry_run: bool, confirm: Callable[[Selection], bool] | None) -> bool:
    """Whether to act on what ``select`` found: not on a dry run (which reports it done), nothing, or a no."""
    if dry_run:
        outcome.done = list(found.targets)
        return False
    if not found.targets:
        return False
    if confirm is not None and not confirm(found):
        outcome.cancelled = True
        return False
    return True


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
    confirm: Callable[[Selection], bool] | None = None,
    max_wait: float = 2.0,
    keeper: LockKeeper | None = None,
) -> Outcome:
    """Move matching dead letters back to their entity: resubmit, then complete the DLQ copy."""
    found = select(client, entity, selection, max_replays=max_replays, limit=limit)
    outcome = Outcome(found, skipped=list(found.skipped))
    if not _go_ahead(found, outcome, dry_run, confirm):
        return outcome
    with _target_sender(client, entity) as sender:

        def resubmit(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
            copy = replay_message(DeadLetter.from_message(message), entity)
            return _complete_after(lambda: sender.send_messages(copy), receiver, message)

        _act_on_targets(
            client,
            entity,
            found,
            outcome,
            resubmit,
            rate=rate,
            on_progress=on_progress,
            max_wait=max_wait,
            keeper=keeper,
        )
    return outcome


def purge(
    client: ServiceBusClient,
    entity: Entity,
    selection: ReplayFilter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    confirm: Callable[[Selection], bool] | None = None,
    max_wait: float = 2.0,
) -> Outcome:
    """Delete matching dead letters for good (complete them in the DLQ)."""
    found = select(client, entity, selection, limit=limit)
    outcome = Outcome(found, skipped=list(found.skipped))
    if not _go_ahead(found, outcome, dry_run, confirm):
        return outcome

    def delete(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
        try:
            receiver.complete_message(message)
        except ServiceBusError:
            return SKIP_LOCK_LOST
        return None

    _act_on_targets(client, entity, found, outcome, delete, max_wait=max_wait)
    return outcome


def dead_letter_active(
    client: ServiceBusClient,
    entity: Entity,
    *,
    message_id: str | None = None,
    sequence_number: int | None = None,
    reason: str = OPERATOR_REASON,
    description: str = "",
    max_wait: float = 2.0,
) -> Outcome:
    """Move chosen active messages (by message id or sequence number) to the dead-letter queue."""
    found = Selection()
    for letter in browse(client, entity, dead_letter=False):
        found.scanned += 1
        if (message_id is not None and letter.message_id == message_id) or (
            sequence_number is not None and letter.sequence_number == sequence_number
        ):
            found.matched.append(letter)
            found.targets.append(letter)
    outcome = Outcome(found)
    if not found.targets:
        return outcome

    def move(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
        try:
            receiver.dead_letter_message(message, reason=reason, error_description=description)
        except ServiceBusError:
            return SKIP_LOCK_LOST
        return None

    _act_on_targets(client, entity, found, outcome, move, dead_letter=False, max_wait=max_wait)
    return outcome


def replay_from_file(
    client: ServiceBusClient, entity: Entity, letters: Sequence[DeadLetter], *, rate: float | None = None
) -> int:
    """Resubmit exported (possibly hand-repaired) dead letters; returns how many were sent."""
    interval = 1.0 / rate if rate else 0.0
    with _target_sender(client, entity) as sender:
        for letter in letters:
            sender.send_messages(replay_message(letter, entity, kind="file-replay"))
            if interval:
                time.sleep(interval)
    return len(letters)
