"""Whatever legal AMQP the broker delivers, the worker reads it or dead-letters it alone, on the first try.

Messages are sent with the real SDK as ``AmqpAnnotatedMessage``s (value and sequence bodies, binary
and uuid ids, a binary reply address) in one batch with healthy requests, and run through the real
pump on the real adapters and the embedded broker.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageProperties

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.memory import MemorySink
from adapters.servicebus import ServiceBusAuth, ServiceBusPublisher, create_client
from tests.integration.emulator import emulator_config, queue, topic
from tests.waiting import collect
from worker.bootstrap import bootstrap
from worker.domain.errors import DeadLetterReason, PublishRejected
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import event_id_for
from worker.service.ports import OutboundEvent
from worker.service.pump import Pump, PumpConfig, settled
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC = "assignment-requests", "assignment-events"
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})
CONFIG = emulator_config([queue(QUEUE, MaxDeliveryCount=10, LockDuration="PT30S")], [topic(TOPIC)])
GOOD = {"user_id": "U1", "experiment_id": "exp_001"}


def data(body: dict[str, Any] | bytes, **properties: Any) -> AmqpAnnotatedMessage:
    """A data-body message with the given AMQP properties."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return AmqpAnnotatedMessage(data_body=raw, properties=AmqpMessageProperties(**properties))


def value(body: Any, message_id: str) -> AmqpAnnotatedMessage:
    """A value-body message."""
    return AmqpAnnotatedMessage(value_body=body, properties=AmqpMessageProperties(message_id=message_id))


#: message id (as the worker will see it) → (message, expected outcome: "complete" or a DeadLetterReason)
CORRELATION = uuid.UUID("0f7b0e58-3c1e-4a55-9b5e-1f6a4c2d9e01")
MESSAGE_UUID = uuid.UUID("5c4b3084-d2c0-4507-827f-a31adebb1e2b")
CASES: dict[str, tuple[AmqpAnnotatedMessage, str]] = {
    **{f"good-{i}": (data({**GOOD, "user_id": f"U{i}"}, message_id=f"good-{i}"), "complete") for i in range(5)},
    "map-value": (value({**GOOD, "user_id": "Umap"}, "map-value"), "complete"),
    "map-nan": (value({**GOOD, "score": float("nan")}, "map-nan"), "InvalidJson"),
    "map-int-key": (value({1: 2, "user_id": "U"}, "map-int-key"), "InvalidJson"),
    "map-binary": (value({"user_id": b"\xff\xfe", "experiment_id": "exp_001"}, "map-binary"), "InvalidJson"),
    "map-uuid": (value({"user_id": uuid.uuid4(), "experiment_id": "exp_001"}, "map-uuid"), "InvalidJson"),
    "int-value": (value(42, "int-value"), "SchemaValidationFailed"),
    "sequence": (
        AmqpAnnotatedMessage(sequence_body=[[1, 2], ["a"]], properties=AmqpMessageProperties(message_id="sequence")),
        "InvalidJson",
    ),
    "reply-bytes": (data(GOOD, message_id="reply-bytes", reply_to=b"\xff\xfe"), "ReplyUndeliverable"),
    "corr-binary": (data(GOOD, message_id="corr-binary", correlation_id=b"\xff\x00"), "SchemaValidationFailed"),
    "data-nan": (
        data(b'{"user_id": "U", "experiment_id": "exp_001", "score": NaN}', message_id="data-nan"),
        "InvalidJson",
    ),
    "huge-int": (
        data(b'{"user_id": "U", "experiment_id": "exp_001", "n": ' + b"7" * 5000 + b"}", message_id="huge-int"),
        "InvalidJson",
    ),
    str(MESSAGE_UUID): (
        data({**GOOD, "user_id": "Uuuid"}, message_id=MESSAGE_UUID, correlation_id=CORRELATION),
        "complete",
    ),
    "12345": (data({**GOOD, "user_id": "Uint"}, message_id=12345, correlation_id=67890), "complete"),
}


@pytest.mark.timeout(120)
def test_legal_amqp_shapes_never_crash_and_poison_is_dead_lettered_alone_on_the_first_try() -> None:
    """One batch of healthy and odd messages: odd ones dead-lettered once with a precise reason, the rest complete."""
    with (
        LocalBroker(BrokerConfig.from_dict(CONFIG)) as broker,
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
    ):
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages([message for message, _ in CASES.values()])
        worker_client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
        try:
            pump = bootstrap(
                WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC, prefetch=50),
                registry=lambda: REGISTRY,
                client=worker_client,
                sink=(sink := MemorySink(max_rows=50)),
                config=PumpConfig(max_batch=50, max_wait=2.0),
            )
            stats = pump.run(until=settled(len(CASES)))
        finally:
            worker_client.close()
        dead: dict[str, tuple[str, str]] = {}
        with client.get_queue_receiver(
            QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
        ) as receiver:
            # As many as the broker holds: not until a receive comes back empty (a slow link open does).
            for message in collect(
                lambda: receiver.receive_messages(max_message_count=100, max_wait_time=1),
                broker.message_counts(QUEUE)["dead_letter"],
                what="the dead letters",
            ):
                key = str(message.message_id)
                dead[key] = (message.dead_letter_reason or "", message.dead_letter_error_description or "")
        events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        with client.get_subscription_receiver(
            TOPIC, "all", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
        ) as receiver:
            for message in collect(
                lambda: receiver.receive_messages(max_message_count=100, max_wait_time=1),
                broker.message_counts(f"{TOPIC}/Subscriptions/all")["active"],
                what="the events",
            ):
                events[str(message.message_id)].append(json.loads(b"".join(message.body)))
        counts = broker.message_counts(QUEUE)
    assert (counts["active"], counts["locked"]) == (0, 0), counts
    # Each message was received exactly once: nothing was abandoned, retried or redelivered.
    assert stats.received == len(CASES)
    assert stats.abandoned == 0
    expected_dead = {m: outcome for m, (_, outcome) in CASES.items() if outcome != "complete"}
    assert {m: reason for m, (reason, _) in dead.items()} == expected_dead
    assert all(description for _, description in dead.values())
    assert "NaN" in dead["map-nan"][1]
    assert "NaN" in dead["data-nan"][1]
    assert "sequence" in dead["sequence"][1]
    assert "reply_to" in dead["reply-bytes"][1]
    assert "correlation_id" in dead["corr-binary"][1]
    assert "4300" in dead["huge-int"][1]
    healthy = [m for m, (_, outcome) in CASES.items() if outcome == "complete"]
    assert stats.completed == len(healthy)
    assert set(events) == {event_id_for(m) for m in healthy}
    assert events[event_id_for(str(MESSAGE_UUID))][0]["correlation_id"] == str(CORRELATION)
    assert events[event_id_for("12345")][0]["correlation_id"] == "67890"
    assert events[event_id_for("map-value")][0]["user_id"] == "Umap"
    assert len(sink.rows) == len(healthy)


REPLIES = "assignment-replies"


def _stop_on_backoff(pump: Pump) -> None:
    """Stop ``pump`` once it backs off from a dependency, or return when it stops by itself."""
    while not pump.stopping:
        if pump.stats.downstream_retries:
            pump.stop()
            return
        time.sleep(0.02)


REPLY_CONFIG = emulator_config([queue(QUEUE, MaxDeliveryCount=1, LockDuration="PT5S"), queue(REPLIES)], [topic(TOPIC)])


@pytest.mark.timeout(120)
def test_a_reply_session_id_no_sender_can_set_is_dead_lettered_alone_not_held_with_its_batch() -> None:
    """AMQP lets a publisher send a reply-to-group-id of any length; the SDK refuses to send a session id
    over 128 characters. The request is dead-lettered as ReplyUndeliverable on its first delivery and the
    rest of its batch completes; before, the SDK's ValueError was taken for an outage of the topic and
    the whole batch was held and retried for as long as the worker ran (max delivery count 1: all of it
    dead-lettered as MaxDeliveryCountExceeded once the worker stopped)."""
    healthy = [data({**GOOD, "user_id": f"U{i}"}, message_id=f"ok-{i}", reply_to=REPLIES) for i in range(5)]
    poison = data(GOOD, message_id="long-session", reply_to=REPLIES, reply_to_group_id="s" * 129)
    with (
        LocalBroker(BrokerConfig.from_dict(REPLY_CONFIG)) as broker,
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
    ):
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages([*healthy[:3], poison, *healthy[3:]])
        worker_client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
        try:
            pump = bootstrap(
                WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC, prefetch=10),
                registry=lambda: REGISTRY,
                client=worker_client,
                sink=MemorySink(max_rows=10),
                config=PumpConfig(max_batch=10, max_wait=2.0, min_backoff=0.05, max_backoff=0.2),
            )
            # Held for an outage the worker believes in: stop it at once (a stop mid-outage abandons).
            watcher = threading.Thread(target=_stop_on_backoff, args=(pump,), daemon=True)
            watcher.start()
            stats = pump.run(until=settled(len(healthy) + 1))
        finally:
            worker_client.close()
        with client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver:
            dead = {
                str(m.message_id): (m.dead_letter_reason, m.dead_letter_error_description)
                for m in collect(
                    lambda: receiver.receive_messages(max_message_count=10, max_wait_time=2),
                    broker.message_counts(QUEUE)["dead_letter"],
                    what="the dead letters",
                )
            }
    assert stats.downstream_retries == 0, "a bad reply session id was taken for an outage of the topic"
    assert stats.completed == len(healthy)
    assert set(dead) == {"long-session"}
    reason, description = dead["long-session"]
    assert reason == "ReplyUndeliverable"
    assert "reply_to_group_id is 129 characters" in str(description)


@pytest.mark.timeout(60)
def test_a_reply_the_sdk_refuses_to_build_is_refused_for_good_and_the_rest_is_sent() -> None:
    """The publisher's own guard, below the receive-side check: a reply the SDK will not build is that
    request's ReplyUndeliverable (after its event reached the topic), never a transient failure."""
    events = [
        OutboundEvent(b"{}", f"e{i}", "c", {}, reply_to=REPLIES, reply_to_session_id=s)
        for i, s in enumerate(["ok", "s" * 129, None])
    ]
    with (
        LocalBroker(BrokerConfig.from_dict(REPLY_CONFIG)) as broker,
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
    ):
        publisher = ServiceBusPublisher(client, TOPIC, requests_queue=QUEUE)
        try:
            with pytest.raises(PublishRejected) as refused:
                publisher.publish(events)
        finally:
            publisher.close()
        counts = broker.message_counts(REPLIES)
    assert set(refused.value.rejected) == {"e1"}
    assert refused.value.reached_topic == {"e1"}
    assert refused.value.rejected["e1"].reason is DeadLetterReason.REPLY_UNDELIVERABLE
    assert counts["active"] == 2
