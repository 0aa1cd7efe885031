"""Allocation through the real worker path with hostile requests: every one decided or dead-lettered precisely.

The embedded broker's queue has max delivery count 1, so a request that made the worker fail
unexpectedly (and abandon it) would show as a ``MaxDeliveryCountExceeded`` dead letter rather than
be retried quietly: each request must be completed with the reason the contract gives
(docs/allocation.md §2.3, §2.5) or dead-lettered with a precise reason of ours. Requests arrive in
every legal AMQP shape (data bodies, AMQP map value bodies with binary strings, sequence bodies), with
context values of every kind against numeric, membership and version conditions, user ids that
collide with an override key in case, whitespace or Unicode normalisation, a segment that contradicts
``context.segment``, and decision times carried at the exact instants of ``start_at``/``end_at``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageProperties

from adapters.local.broker import LocalBroker
from adapters.memory import MemorySink
from tests.integration.emulator import emulator_config, queue, run_pump, running_broker, topic
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import REPLAY_ORIGINAL_ENQUEUED_TIME
from worker.service.pump import PumpStats

pytestmark = pytest.mark.integration

QUEUE, TOPIC = "assignment-requests", "assignment-events"
CONFIG = emulator_config([queue(QUEUE, MaxDeliveryCount=1, LockDuration="PT30S")], [topic(TOPIC)])
SPLIT = {"control": 0.5, "blue": 0.5}
REGISTRY = ExperimentRegistry.from_dict(
    {
        "experiments": [
            {
                "id": "t",
                "split": SPLIT,
                "targeting": {"age": {"$gt": 17}, "app": {"$vgte": "5.2.0"}, "plan": {"$in": ["pro", 1, True]}},
            },
            {"id": "o", "split": SPLIT, "overrides": {"qa": "blue", "\u00e9": "blue"}, "coverage": 0},
            {"id": "g", "split": SPLIT, "segments": {"vip": {"blue": 1.0}}, "targeting": {"segment": "vip"}},
            {"id": "s", "split": SPLIT, "start_at": "2026-01-01T00:00:00Z", "end_at": "2026-06-01T00:00:00Z"},
        ]
    }
)
GOOD = {"age": 30, "app": "5.2.0", "plan": "pro"}


def _data(user: str, experiment: str, **fields: Any) -> AmqpAnnotatedMessage:
    body = json.dumps({"user_id": user, "experiment_id": experiment, **fields}).encode()
    return AmqpAnnotatedMessage(data_body=body, properties=AmqpMessageProperties(message_id=f"m-{user}"))


def _when(user: str, at: str) -> AmqpAnnotatedMessage:
    message = _data(user, "s")
    message.application_properties = {REPLAY_ORIGINAL_ENQUEUED_TIME: at}
    return message


def _value(user: str, body: Any) -> AmqpAnnotatedMessage:
    return AmqpAnnotatedMessage(value_body=body, properties=AmqpMessageProperties(message_id=f"m-{user}"))


#: user id → (the message, the reason its event must carry, or the dead-letter reason).
REQUESTS: dict[str, tuple[AmqpAnnotatedMessage, str]] = {
    # Targeting: numbers, booleans vs numbers, membership across kinds, versions.
    "t-good": (_data("t-good", "t", context=GOOD), "bucketed"),
    "t-float-max": (_data("t-float-max", "t", context={**GOOD, "age": 1e308}), "bucketed"),
    "t-age-bool": (_data("t-age-bool", "t", context={**GOOD, "age": True}), "targeting"),
    "t-age-text": (_data("t-age-text", "t", context={**GOOD, "age": "30"}), "targeting"),
    "t-age-object": (_data("t-age-object", "t", context={**GOOD, "age": {"years": 30}}), "targeting"),
    "t-plan-true": (_data("t-plan-true", "t", context={**GOOD, "plan": True}), "bucketed"),
    "t-plan-1.0": (_data("t-plan-1.0", "t", context={**GOOD, "plan": 1.0}), "bucketed"),
    "t-plan-false": (_data("t-plan-false", "t", context={**GOOD, "plan": False}), "targeting"),
    "t-plan-Pro": (_data("t-plan-Pro", "t", context={**GOOD, "plan": "Pro"}), "targeting"),
    "t-beta": (_data("t-beta", "t", context={**GOOD, "app": "5.2.0-beta"}), "targeting"),
    "t-5.2": (_data("t-5.2", "t", context={**GOOD, "app": "5.2"}), "bucketed"),
    "t-5.10": (_data("t-5.10", "t", context={**GOOD, "app": "5.10"}), "bucketed"),
    "t-05.2": (_data("t-05.2", "t", context={**GOOD, "app": "05.2"}), "targeting"),
    "t-empty-app": (_data("t-empty-app", "t", context={**GOOD, "app": ""}), "targeting"),
    "t-fullwidth": (_data("t-fullwidth", "t", context={**GOOD, "app": "５.２.０"}), "targeting"),
    "t-arabic": (_data("t-arabic", "t", context={**GOOD, "app": "٥.٢.٠"}), "targeting"),
    "t-app-number": (_data("t-app-number", "t", context={**GOOD, "app": 5.2}), "targeting"),
    "t-missing": (_data("t-missing", "t", context={"age": 30, "plan": "pro"}), "targeting"),
    "t-null": (_data("t-null", "t", context={**GOOD, "app": None}), "targeting"),
    # An AMQP map value body: binary keys and strings read as text, a 32-bit integer as a number.
    "t-map": (
        _value(
            "t-map",
            {
                b"user_id": b"t-map",
                b"experiment_id": b"t",
                b"context": {b"age": 2**31 - 1, b"app": b"10.0.0-rc.1", b"plan": b"pro"},
            },
        ),
        "bucketed",
    ),
    "t-map-list": (
        _value("t-map-list", {"user_id": "t-map-list", "experiment_id": "t", "context": [b"age", 30]}),
        "SchemaValidationFailed",
    ),
    "t-sequence": (
        AmqpAnnotatedMessage(sequence_body=[{"user_id": "t-sequence", "experiment_id": "t"}]),
        "InvalidJson",
    ),
    "t-context-text": (_data("t-context-text", "t", context="age=30"), "SchemaValidationFailed"),
    # Overrides match the user id exactly: no case folding, trimming or normalisation.
    "qa": (_data("qa", "o"), "override"),
    "QA": (_data("QA", "o"), "coverage"),
    "qa ": (_data("qa ", "o"), "coverage"),
    "\u00e9": (_data("\u00e9", "o"), "override"),  # precomposed é, as configured
    "e\u0301": (_data("e\u0301", "o"), "coverage"),  # e + combining acute: another user
    # The request's segment field beats context.segment (docs/allocation.md §2.3).
    "g-field": (_data("g-field", "g", segment="vip", context={"segment": "regular"}), "bucketed"),
    "g-context": (_data("g-context", "g", context={"segment": "vip"}), "bucketed"),
    "g-contradicted": (_data("g-contradicted", "g", segment="regular", context={"segment": "vip"}), "targeting"),
    # The decision time carried by a replayed copy, at the exact instants of the window.
    "s-before": (_when("s-before", "2025-12-31T23:59:59.999999+00:00"), "not_started"),
    "s-start": (_when("s-start", "2026-01-01T00:00:00+00:00"), "bucketed"),
    "s-start-offset": (_when("s-start-offset", "2026-01-01T01:00:00+01:00"), "bucketed"),
    "s-last": (_when("s-last", "2026-05-31T23:59:59.999999Z"), "bucketed"),
    "s-end": (_when("s-end", "2026-06-01T00:00:00Z"), "ended"),
    # A carried time the worker must not believe: dead-lettered naming the property, never abandoned.
    "s-naive": (_when("s-naive", "2026-01-01T00:00:00"), "SchemaValidationFailed"),
    "s-year-0": (_when("s-year-0", "0001-01-01T00:00:00+00:01"), "SchemaValidationFailed"),
    "s-year-10000": (_when("s-year-10000", "9999-12-31T23:59:59-00:01"), "SchemaValidationFailed"),
}
DEAD_LETTER_REASONS = {"SchemaValidationFailed", "InvalidJson"}


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """The embedded broker, its queue with max delivery count 1."""
    with running_broker(CONFIG) as running:
        yield running


def _work(broker: LocalBroker, count: int, sink: MemorySink) -> PumpStats:
    return run_pump(broker, REGISTRY, count, sink=sink, max_batch=50)


@pytest.mark.timeout(180)
def test_every_hostile_request_is_decided_with_its_reason_or_dead_lettered_precisely(broker: LocalBroker) -> None:
    """Nothing abandoned (a burned delivery count would be a MaxDeliveryCountExceeded dead letter)."""
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_sender(QUEUE) as sender,
    ):
        sender.send_messages([message for message, _ in REQUESTS.values()])
    sink = MemorySink()

    stats = _work(broker, len(REQUESTS), sink)

    expected_dead = sum(1 for _, reason in REQUESTS.values() if reason in DEAD_LETTER_REASONS)
    assert stats.abandoned == 0
    assert dict(stats.dead_letters) == {
        reason: sum(1 for _, r in REQUESTS.values() if r == reason) for reason in DEAD_LETTER_REASONS
    }
    assert sum(stats.dead_letters.values()) == expected_dead
    reasons = {row.UserId: row.Reason for row in [*sink.rows, *sink.buffer]}
    expected = {user: reason for user, (_, reason) in REQUESTS.items() if reason not in DEAD_LETTER_REASONS}
    assert reasons == expected
    assert broker.message_counts(QUEUE)["active"] == 0
