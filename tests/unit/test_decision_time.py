"""A replayed request is decided as its original was: same event ids, byte-identical bodies (issue 16 §3).

The time a request is decided at is its original enqueued time, carried by a replayed copy in
``ab_replay_original_enqueued_time``; a value of that (publisher-controllable) property the worker
cannot believe dead-letters the request, naming the property. And an event that reached the topic
always gets its row, even when its request is dead-lettered because the reply could not go.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from adapters.memory import MemoryPublisher, MemorySink, MemorySource
from adapters.servicebus.dlq import DeadLetter, Entity, original_decision_time, replay_message
from tests.dead_letters import dead_letter
from worker.domain.errors import DeadLetterReason, PermanentError
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import (
    REPLAY_ORIGINAL_ENQUEUED_TIME,
    REPLAY_ORIGINAL_MESSAGE_ID,
    decision_time,
    event_id_for,
    handle,
)
from worker.service.ports import Delivery
from worker.service.pump import Pump, PumpConfig

REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})
SINGLE = json.dumps({"user_id": "U1", "experiment_id": "exp_001", "request_id": "r1"}).encode()
COHORT = json.dumps(
    {
        "kind": "cohort",
        "experiment_id": "exp_c",
        "seed": 7,
        "arms": [{"id": "control", "weight": 1}, {"id": "treatment", "weight": 1}],
        "members": [{"member_id": f"C{i}", "segment": "s"} for i in range(6)],
    }
).encode()
FIRST = datetime(2026, 11, 24, 8, 15, 2, 123000, tzinfo=UTC)


def _as_dead_letter(delivery: Delivery, sequence_number: int = 11) -> DeadLetter:
    """What ``dlq replay`` reads back from the DLQ for this delivery (the broker keeps its enqueued time)."""
    return DeadLetter(
        sequence_number=sequence_number,
        enqueued_time=delivery.enqueued_time,
        delivery_count=1,
        reason="ReplyUndeliverable",
        description="reply entity missing",
        message_id=delivery.message_id,
        correlation_id=delivery.correlation_id,
        content_type="application/json",
        body=delivery.body,
        application_properties=dict(delivery.application_properties),
    )


def _copy_delivered(letter: DeadLetter, enqueued: datetime) -> Delivery:
    """The replayed copy as the worker receives it, enqueued at ``enqueued``."""
    copy = replay_message(letter, Entity.parse("assignment-requests"))
    properties = {str(k): v for k, v in (copy.application_properties or {}).items()}
    return Delivery(
        body=letter.body,
        message_id=str(copy.message_id),
        correlation_id=letter.correlation_id,
        application_properties=properties,
        enqueued_time=enqueued,
    )


def _bodies(delivery: Delivery) -> list[bytes]:
    handled = handle(delivery, REGISTRY)
    return [m.body for m in handled.outbound(delivery)]


@pytest.mark.parametrize("body", [SINGLE, COHORT], ids=["single", "cohort"])
def test_a_replayed_copy_publishes_byte_identical_events_even_replayed_twice(body: bytes) -> None:
    """Original at T0, its copy at T0+1h, the copy's copy at T0+1d: every event body is the same bytes."""
    original = Delivery(body=body, message_id="req-1", correlation_id="corr", enqueued_time=FIRST)
    first = _bodies(original)

    copy = _copy_delivered(_as_dead_letter(original), FIRST + timedelta(hours=1))
    copy_of_copy = _copy_delivered(_as_dead_letter(copy, 12), FIRST + timedelta(days=1))

    assert copy.application_properties[REPLAY_ORIGINAL_ENQUEUED_TIME] == "2026-11-24T08:15:02.123000+00:00"
    assert copy_of_copy.application_properties[REPLAY_ORIGINAL_ENQUEUED_TIME] == "2026-11-24T08:15:02.123000+00:00"
    assert copy_of_copy.application_properties[REPLAY_ORIGINAL_MESSAGE_ID] == "req-1"
    assert _bodies(copy) == first
    assert _bodies(copy_of_copy) == first
    assert json.loads(first[0])["assigned_at"] == "2026-11-24T08:15:02.123000Z"


def test_decision_time_is_the_delivery_enqueued_time_without_the_property() -> None:
    """A first delivery is decided at its own enqueued time; a source without one, at the current time."""
    assert decision_time(Delivery(body=b"", message_id="m", enqueued_time=FIRST)) == FIRST
    before = datetime.now(UTC)
    assert decision_time(Delivery(body=b"", message_id="m", enqueued_time=None)) >= before


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-24T08:15:02.123000+00:00", FIRST),
        ("2026-11-24T08:15:02.123Z", FIRST),
        ("2026-11-24T10:15:02.123+02:00", FIRST),
        ("2026-11-24T09:00:00+00:00", datetime(2026, 11, 24, 9, 0, tzinfo=UTC)),  # equal to its own: still believed
    ],
)
def test_a_believable_original_time_is_read_in_utc(value: str, expected: datetime) -> None:
    """Any UTC offset is read and normalised to UTC, so the event says the same instant the same way."""
    delivery = Delivery(
        body=SINGLE,
        message_id="m",
        application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: value},
        enqueued_time=datetime(2026, 11, 24, 9, 0, tzinfo=UTC),
    )
    when = decision_time(delivery)
    assert when == expected
    assert when.tzinfo is UTC
    assert handle(delivery, REGISTRY).events[0].assigned_at == expected


NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2026-11-24T09:00:00.001+00:00", "later than this message's own enqueued time"),
        ("2999-01-01T00:00:00+00:00", "later than this message's own enqueued time"),
        ("2026-11-24T08:15:02", "has no UTC offset"),
        ("yesterday", "is not an ISO 8601 time"),
        ("", "is not an ISO 8601 time"),
        ("2026-11-24T08:15:02+00:00" + " " * 60, "at most 64"),
        ("9" * 100_000, "at most 64"),
        (1_764_000_000_000, "not int"),
        (b"2026-11-24T08:15:02+00:00", "not bytes"),
        (NOW - timedelta(hours=1), "not datetime"),
        (None, "not NoneType"),
        (["2026-11-24T08:15:02+00:00"], "not list"),
    ],
)
def test_an_unbelievable_original_time_dead_letters_the_request_naming_the_property(
    value: object, problem: str
) -> None:
    """The property is the publisher's to set: a later, unzoned, malformed or non-text value is refused."""
    delivery = Delivery(
        body=SINGLE,
        message_id="m",
        application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: value},
        enqueued_time=NOW,
    )
    with pytest.raises(PermanentError) as refused:
        handle(delivery, REGISTRY)
    assert refused.value.reason is DeadLetterReason.SCHEMA_VALIDATION_FAILED
    assert refused.value.description.startswith(f"application property {REPLAY_ORIGINAL_ENQUEUED_TIME}: ")
    assert problem in refused.value.description
    assert len(refused.value.description) < 400, "a huge value is quoted shortened"


def test_a_cohort_with_an_unbelievable_time_is_refused_before_anything_is_decided() -> None:
    """Cohorts read the same property the same way."""
    delivery = Delivery(
        body=COHORT,
        message_id="m",
        application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: "2999-01-01T00:00:00Z"},
        enqueued_time=NOW,
    )
    with pytest.raises(PermanentError, match=REPLAY_ORIGINAL_ENQUEUED_TIME):
        handle(delivery, REGISTRY)


def _letter(**fields: object) -> DeadLetter:
    base = {"sequence_number": 3, "enqueued_time": FIRST, "reason": "SchemaValidationFailed", "message_id": "req-9"}
    return dead_letter(**{**base, "body": SINGLE, **fields})


def test_a_copy_of_a_letter_whose_time_was_refused_is_decided_at_the_letters_own_time() -> None:
    """The worker refused that value before deciding anything, so the letter's own enqueued time is the original's."""
    letter = _letter(application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: "2999-01-01T00:00:00Z"})
    assert original_decision_time(letter) == FIRST
    copy = replay_message(letter, Entity.parse("q"))
    assert (copy.application_properties or {})[REPLAY_ORIGINAL_ENQUEUED_TIME] == FIRST.isoformat()


def test_a_copy_from_an_export_without_a_time_is_decided_when_it_is_enqueued() -> None:
    """No enqueued time and no carried one: nothing to carry (a stale carried value is not kept either)."""
    bare = replay_message(_letter(enqueued_time=None), Entity.parse("q"))
    assert REPLAY_ORIGINAL_ENQUEUED_TIME not in (bare.application_properties or {})
    stale = _letter(enqueued_time=None, application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: "garbage"})
    assert REPLAY_ORIGINAL_ENQUEUED_TIME not in (replay_message(stale, Entity.parse("q")).application_properties or {})


def test_an_exported_time_without_an_offset_is_utc() -> None:
    """A hand-edited export may drop the offset; the copy still carries a zoned UTC time, never local time."""
    naive = _letter(enqueued_time=datetime(2026, 11, 24, 8, 15, 2))
    copy = replay_message(naive, Entity.parse("q"))
    assert (copy.application_properties or {})[REPLAY_ORIGINAL_ENQUEUED_TIME] == "2026-11-24T08:15:02+00:00"
    offset = _letter(enqueued_time=datetime(2026, 11, 24, 10, 15, 2, tzinfo=timezone(timedelta(hours=2))))
    copy = replay_message(offset, Entity.parse("q"))
    assert (copy.application_properties or {})[REPLAY_ORIGINAL_ENQUEUED_TIME] == "2026-11-24T08:15:02+00:00"


# -- an event that reached the topic always gets its row ----------------------------------------------


class _Journal:
    """One ordered record of what the sink flushed and the source settled, to check which came first."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []


class _JournalSink(MemorySink):
    def __init__(self, journal: _Journal) -> None:
        super().__init__()
        self.journal = journal

    def flush(self) -> None:
        pending = [r.EventId for r in self.buffer]
        super().flush()
        self.journal.entries.extend(("row", event_id) for event_id in pending)


class _JournalSource(MemorySource):
    def __init__(self, journal: _Journal) -> None:
        super().__init__()
        self.journal = journal

    def dead_letter(self, delivery: Delivery, reason: str, description: str) -> None:
        super().dead_letter(delivery, reason, description)
        self.journal.entries.append(("dead-letter", delivery.message_id))


def _run(source: MemorySource, publisher: MemoryPublisher, sink: MemorySink) -> None:
    Pump(source, publisher, sink, lambda: REGISTRY, config=PumpConfig(max_batch=10)).run(idle_exit=0)


def _refused_reply(*message_ids: str) -> dict[str, PermanentError]:
    return {
        m: PermanentError(DeadLetterReason.REPLY_UNDELIVERABLE, "reply_to 'gone' does not exist") for m in message_ids
    }


def test_an_event_on_the_topic_gets_its_row_before_its_request_is_dead_lettered() -> None:
    """The topic took m2's event, then its reply was refused: m2's row is flushed, then m2 is dead-lettered."""
    journal = _Journal()
    source, sink = _JournalSource(journal), _JournalSink(journal)
    publisher = MemoryPublisher(reject_reply=_refused_reply(event_id_for("m2")))
    for i in range(4):
        source.send(json.dumps({"user_id": f"U{i}", "experiment_id": "exp_001"}), message_id=f"m{i}", reply_to="gone")
    _run(source, publisher, sink)

    assert [(d.delivery.message_id, d.reason) for d in source.dead_letters] == [("m2", "ReplyUndeliverable")]
    assert sorted(d.message_id for d in source.completed) == ["m0", "m1", "m3"]
    assert sorted(r.UserId for r in sink.rows) == ["U0", "U1", "U2", "U3"]
    assert journal.entries.index(("row", event_id_for("m2"))) < journal.entries.index(("dead-letter", "m2"))
    assert publisher.calls == 1, "nothing is published twice"


def test_every_member_row_of_a_cohort_on_the_topic_is_recorded_before_it_is_dead_lettered() -> None:
    """A cohort's reply refused after its member events reached the topic: each member has its row."""
    source, sink = MemorySource(), MemorySink()
    probe = handle(Delivery(body=COHORT, message_id="c1"), REGISTRY)
    ids = [e.event_id for e in probe.events] + [m.message_id for m in probe.extras]
    _run_one(source, MemoryPublisher(reject_reply=_refused_reply(*ids)), sink, COHORT, "c1")
    assert [d.reason for d in source.dead_letters] == ["ReplyUndeliverable"]
    assert sorted(r.UserId for r in sink.rows) == [f"C{i}" for i in range(6)]


def test_an_event_the_topic_refused_gets_no_row() -> None:
    """Refused by the topic itself (too large): no subscriber has it, so no row; dead-lettered at once."""
    source, sink = MemorySource(), MemorySink()
    refused = {event_id_for("m1"): PermanentError(DeadLetterReason.EVENT_TOO_LARGE, "too large")}
    _run_one(source, MemoryPublisher(reject=refused), sink, SINGLE, "m1")
    assert [d.reason for d in source.dead_letters] == ["EventTooLarge"]
    assert sink.rows == []


def _run_one(source: MemorySource, publisher: MemoryPublisher, sink: MemorySink, body: bytes, message_id: str) -> None:
    source.send(body.decode(), message_id=message_id, reply_to="gone")
    _run(source, publisher, sink)
