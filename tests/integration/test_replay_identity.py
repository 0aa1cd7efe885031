"""A replay of a request whose event already went out publishes that event again byte for byte, and the
event that went out has its row (issue 16 §3). Real SDK, embedded broker, the worker's own pump.

The topic runs without duplicate detection here, as it is for a replay after its window: every copy
of an event reaches the subscription, so two bodies under one id would show.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)

from adapters.local.broker import LocalBroker
from adapters.memory import MemorySink
from tests.integration.emulator import emulator_config, queue, run_pump, running_broker, topic
from tests.waiting import wait_for
from worker.cli import main
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import REPLAY_ORIGINAL_ENQUEUED_TIME, event_id_for
from worker.service.pump import PumpStats

pytestmark = pytest.mark.integration

QUEUE, TOPIC, REPLIES = "assignment-requests", "assignment-events", "replies"
CONFIG = emulator_config(
    [
        queue(
            QUEUE,
            MaxDeliveryCount=1,
            LockDuration="PT30S",
            RequiresDuplicateDetection=True,
            DuplicateDetectionHistoryTimeWindow="PT10M",
        ),
        queue(REPLIES),
    ],
    [topic(TOPIC)],
)
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBroker]:
    """The embedded broker (max delivery count 1: a burned count shows as a dead letter), the CLI pointed at it."""
    with running_broker(CONFIG, monkeypatch) as running:
        yield running


def _work(broker: LocalBroker, sink: MemorySink, count: int) -> PumpStats:
    """The worker's pump on the real SDK until ``count`` requests were settled."""
    return run_pump(broker, REGISTRY, count, sink=sink)


def _publish(broker: LocalBroker, messages: list[ServiceBusMessage]) -> None:
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_sender(QUEUE) as sender,
    ):
        sender.send_messages(messages)


def _drain(
    broker: LocalBroker, entity: str, count: int, sub_queue: ServiceBusSubQueue | None = None
) -> list[ServiceBusReceivedMessage]:
    """Take ``count`` messages off a queue (or the topic's subscription 'all')."""
    got: list[ServiceBusReceivedMessage] = []
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        mode = ServiceBusReceiveMode.RECEIVE_AND_DELETE
        receiver = (
            client.get_subscription_receiver(TOPIC, "all", receive_mode=mode)
            if entity == TOPIC
            else client.get_queue_receiver(entity, sub_queue=sub_queue, receive_mode=mode)
        )
        with receiver:

            def taken() -> bool:
                got.extend(receiver.receive_messages(max_message_count=count - len(got), max_wait_time=2))
                return len(got) >= count

            wait_for(taken, 100, f"{count} messages on {entity}", interval=0, detail=lambda: f"{len(got)} arrived")
    return got


@pytest.mark.timeout(240)
def test_a_replay_after_a_missing_reply_queue_republishes_each_event_byte_identical_with_its_row(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reply queue missing: 5 events reach the topic, rows are kept, requests dead-lettered; the queue
    appears, `dlq replay --all`: the same 5 event ids again, each body the same bytes, replies delivered."""
    broker.refuse_sends(REPLIES, "amqp:not-found")  # the reply queue does not exist (yet)
    _publish(
        broker,
        [
            ServiceBusMessage(
                json.dumps({"user_id": f"U{i}", "experiment_id": "exp_001"}), message_id=f"req-{i}", reply_to=REPLIES
            )
            for i in range(5)
        ],
    )
    sink = MemorySink()

    first = _work(broker, sink, 5)

    assert first.dead_letters == {"ReplyUndeliverable": 5}
    assert sorted(r.EventId for r in sink.rows) == sorted(event_id_for(f"req-{i}") for i in range(5)), (
        "an event that reached the topic has no row"
    )
    assert broker.message_counts(QUEUE)["dead_letter"] == 5

    broker.clear_faults()  # the reply queue appears
    assert main(["dlq", "replay", "--all"]) == 0
    assert "replayed 5 of 5" in capsys.readouterr().err
    second = _work(broker, sink, 5)

    assert second.completed == 5
    assert broker.message_counts(QUEUE) == {**broker.message_counts(QUEUE), "active": 0, "dead_letter": 0}
    bodies: dict[str, list[bytes]] = defaultdict(list)
    for event in _drain(broker, TOPIC, 10):
        bodies[str(event.message_id)].append(b"".join(event.body))
    assert sorted(bodies) == sorted(event_id_for(f"req-{i}") for i in range(5))
    for event_id, copies in bodies.items():
        assert len(copies) == 2
        assert copies[0] == copies[1], f"event {event_id} was published with two different bodies"
    replies = _drain(broker, REPLIES, 5)
    assert {b"".join(r.body) for r in replies} == {copies[0] for copies in bodies.values()}
    rows = defaultdict(set)
    for row in sink.rows:
        rows[row.EventId].add(row.model_dump_json())
    assert all(len(versions) == 1 for versions in rows.values()), "the second row differs from the first"


@pytest.mark.timeout(120)
def test_the_original_time_property_is_believed_only_when_it_can_be_true(broker: LocalBroker) -> None:
    """Through the SDK's own encoding (string, AMQP timestamp, long, binary): only a zoned ISO time no
    later than the message decides; every other value dead-letters its request, naming the property."""
    past = datetime.now(UTC) - timedelta(days=3)
    values: dict[str, object] = {
        "good": past.isoformat(),
        "future": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
        "naive": past.replace(tzinfo=None).isoformat(),
        "garbage": "last tuesday",
        "timestamp": past,  # the SDK sends a datetime as an AMQP timestamp
        "int": 1_764_000_000,  # seconds since the epoch: a number, not a time
        "binary": past.isoformat().encode(),  # the SDK sends bytes as a string: the same time
        "huge": "2" * 10_000,
    }
    _publish(
        broker,
        [
            ServiceBusMessage(
                json.dumps({"user_id": f"U-{name}", "experiment_id": "exp_001"}),
                message_id=name,
                application_properties={REPLAY_ORIGINAL_ENQUEUED_TIME: value},  # type: ignore[dict-item]
            )
            for name, value in values.items()
        ],
    )
    sink = MemorySink()

    stats = _work(broker, sink, len(values))

    assert stats.completed == 2
    assert sorted((row.UserId, row.AssignedAt) for row in sink.rows) == [("U-binary", past), ("U-good", past)]
    dead = {
        str(m.message_id): (m.dead_letter_reason, str(m.dead_letter_error_description))
        for m in _drain(broker, QUEUE, len(values) - 2, ServiceBusSubQueue.DEAD_LETTER)
    }
    assert set(dead) == set(values) - {"good", "binary"}
    for name, (reason, description) in dead.items():
        assert reason == "SchemaValidationFailed", name
        assert description.startswith(f"application property {REPLAY_ORIGINAL_ENQUEUED_TIME}: "), (name, description)
    assert "later than this message's own enqueued time" in dead["future"][1]
    assert "no UTC offset" in dead["naive"][1]
