"""Decoding and cohort limits: odd input is refused on the first try with a precise reason."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from adapters.servicebus.dlq import Entity, replay_copy
from tests.dead_letters import dead_letter
from worker.domain.errors import DeadLetterReason, PermanentError
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import DEFAULT_MAX_EVENT_BYTES, REPLAY_ORIGINAL_ENQUEUED_TIME, handle
from worker.service.ports import Delivery

REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})


def refusal(body: bytes, **kwargs: object) -> PermanentError:
    """The PermanentError ``handle`` raises for this body."""
    with pytest.raises(PermanentError) as caught:
        handle(Delivery(body=body, message_id="m1"), REGISTRY, **kwargs)  # type: ignore[arg-type]
    return caught.value


@pytest.mark.parametrize("where", ["top", "context", "list"])
def test_integer_longer_than_4300_digits_is_invalid_json(where: str) -> None:
    """A >4,300-digit integer anywhere in the body is InvalidJson, not an unexpected error."""
    huge = "9" * 4301
    body = {
        "top": f'{{"user_id": "U1", "experiment_id": "exp_001", "n": {huge}}}',
        "context": f'{{"user_id": "U1", "experiment_id": "exp_001", "context": {{"k": {huge}}}}}',
        "list": f'{{"user_id": "U1", "experiment_id": "exp_001", "context": {{"k": [1, -{huge}]}}}}',
    }[where]
    error = refusal(body.encode())
    assert error.reason is DeadLetterReason.INVALID_JSON
    assert "4300" in error.description


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["top", "context", "list"])
def test_nan_and_infinity_literals_are_invalid_json_as_in_a_value_body(where: str, literal: str) -> None:
    """Python's parser takes NaN and Infinity, which JSON (RFC 8259), the JSON Schema and every other
    language's parser refuse, and an AMQP value body holding them is InvalidJson already. A data body
    was assigned instead: the value reached targeting as a float (Infinity passed `$gte`) and went out
    as null in the event."""
    body = {
        "top": f'{{"user_id": "U1", "experiment_id": "exp_001", "n": {literal}}}',
        "context": f'{{"user_id": "U1", "experiment_id": "exp_001", "context": {{"score": {literal}}}}}',
        "list": f'{{"user_id": "U1", "experiment_id": "exp_001", "context": {{"k": [1, {literal}]}}}}',
    }[where]
    error = refusal(body.encode())
    assert error.reason is DeadLetterReason.INVALID_JSON
    assert literal in error.description


def test_unreadable_delivery_is_refused_with_its_own_reason() -> None:
    """A source that could not read a message sets ``unreadable``; handling raises exactly that."""
    unreadable = PermanentError(DeadLetterReason.REPLY_UNDELIVERABLE, "reply_to is 2 bytes of binary, not text")
    delivery = Delivery(body=b'{"user_id": "U1", "experiment_id": "exp_001"}', message_id="m", unreadable=unreadable)
    with pytest.raises(PermanentError) as caught:
        handle(delivery, REGISTRY)
    assert caught.value is unreadable


def test_cohort_whose_report_would_outgrow_a_message_is_event_too_large_up_front() -> None:
    """1,813 one-member segments × 64 arms (a 9.7 MB report) is refused before anything is published."""
    arms = [{"id": f"arm{i}"} for i in range(64)]
    members = [{"member_id": f"M{i}", "segment": f"s{i}"} for i in range(1813)]
    body = json.dumps({"kind": "cohort", "experiment_id": "e", "arms": arms, "members": members}).encode()
    started = time.monotonic()
    error = refusal(body, max_body_bytes=len(body))
    assert error.reason is DeadLetterReason.EVENT_TOO_LARGE
    assert "1813 segments × 64 arms" in error.description
    assert f"the limit is {DEFAULT_MAX_EVENT_BYTES} bytes" in error.description
    print(f"\n[cohort-too-large] refused in {time.monotonic() - started:.2f}s: {error.description[:120]}")


def test_cohort_report_within_the_limit_is_published() -> None:
    """A cohort whose report fits is assigned as before (and a lower limit refuses the same cohort)."""
    members = [{"member_id": f"M{i}", "segment": "vip" if i % 2 else "std"} for i in range(40)]
    body = json.dumps(
        {"kind": "cohort", "experiment_id": "e", "arms": [{"id": "a"}, {"id": "b"}], "members": members}
    ).encode()
    handled = handle(Delivery(body=body, message_id="c"), REGISTRY)
    (report,) = handled.extras
    assert len(report.body) < DEFAULT_MAX_EVENT_BYTES
    assert refusal(body, max_event_bytes=len(report.body) - 1).reason is DeadLetterReason.EVENT_TOO_LARGE


@pytest.mark.parametrize("carried", ["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01"])
def test_a_carried_original_time_outside_years_1_to_9999_in_utc_is_schema_validation_failed(carried: str) -> None:
    """``ab_replay_original_enqueued_time`` is publisher-settable: a time in year 0 or 10000 once in UTC
    dead-letters its request naming the property. Before: OverflowError, so the pump abandoned it (a
    burned delivery count per try) and ``dlq replay`` of the dead letter failed on the same error."""
    enqueued = datetime(2026, 12, 1, tzinfo=UTC)
    delivery = Delivery(
        body=b'{"user_id": "U1", "experiment_id": "exp_001"}',
        message_id="m1",
        enqueued_time=enqueued,
        application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: carried},
    )
    with pytest.raises(PermanentError) as caught:
        handle(delivery, REGISTRY)
    assert caught.value.reason is DeadLetterReason.SCHEMA_VALIDATION_FAILED
    assert REPLAY_ORIGINAL_ENQUEUED_TIME in caught.value.description
    letter = dead_letter(
        sequence_number=7,
        enqueued_time=enqueued,
        reason="MaxDeliveryCountExceeded",
        message_id="m1",
        body=delivery.body,
        application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: carried},
    )
    copy = replay_copy(letter, Entity(queue="q"))
    assert copy.application_properties[REPLAY_ORIGINAL_ENQUEUED_TIME] == enqueued.isoformat()


def test_a_cohort_repeating_a_member_its_allocation_decides_is_invalid_cohort_naming_request_positions() -> None:
    """Allocation takes the members it decides (here an override) out before stratification, which is
    where repeated ids were found: a repeated overridden member was published twice under one event id
    (with different segments), and a repeat among the rest was named by its position in the remainder."""
    registry = ExperimentRegistry.from_dict(
        {"experiments": [{"id": "e", "split": {"control": 0.5, "blue": 0.5}, "overrides": {"qa": "blue"}}]}
    )
    members = [
        {"member_id": "qa", "segment": "vip"},
        {"member_id": "qa", "segment": "std"},
        *({"member_id": f"M{i}", "segment": "vip"} for i in range(6)),
        {"member_id": "M1", "segment": "vip"},
    ]
    body = json.dumps({"kind": "cohort", "experiment_id": "e", "arms": [{"id": "a"}, {"id": "b"}], "members": members})
    delivery = Delivery(body=body.encode(), message_id="c", enqueued_time=datetime(2026, 12, 1, tzinfo=UTC))

    with pytest.raises(PermanentError) as caught:
        handle(delivery, registry)

    assert caught.value.reason is DeadLetterReason.INVALID_COHORT
    assert caught.value.description == (
        "members[1]: duplicate member id 'qa' (first at members[0]); "
        "members[8]: duplicate member id 'M1' (first at members[3])"
    )
