"""The local Service Bus broker driven by the real azure-servicebus SDK."""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusReceiver,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    MessageLockLostError,
    MessagingEntityNotFoundError,
)

from adapters.local.broker import BrokerConfig, BrokerConfigError, LocalBroker
from tests.waiting import wait_for

from .conftest import TEST_BROKER_CONFIG

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

QUEUE = "assignment-requests"
#: What ``message_counts`` reports for an entity with nothing left in it.
EMPTY = {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0, "scheduled": 0}
_F = TypeVar("_F", bound=Callable[..., Any])


def receive_n(
    receiver: ServiceBusReceiver, count: int, timeout: float = 30.0, wait: float = 1.0
) -> list[ServiceBusReceivedMessage]:
    """Receive exactly ``count`` messages, failing the test if they do not all arrive within ``timeout``.

    ``wait`` bounds each receive call; after a connection loss the SDK must reopen its link
    within that budget, so recovery tests pass a larger one.
    """
    got: list[ServiceBusReceivedMessage] = []

    def arrived() -> bool:
        got.extend(receiver.receive_messages(max_message_count=count - len(got), max_wait_time=wait))
        return len(got) >= count

    wait_for(arrived, timeout, f"{count} messages from {receiver.entity_path}", interval=0)
    return got


def send(client: ServiceBusClient, entity: str, *messages: ServiceBusMessage) -> None:
    """Send messages to a queue or topic."""
    with client.get_queue_sender(entity) as sender:
        sender.send_messages(list(messages))


def test_send_receive_complete(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(
        sb_client,
        QUEUE,
        ServiceBusMessage(
            b'{"user": "u1"}',
            message_id="m-1",
            application_properties={"kind": "request"},
            content_type="application/json",
            subject="assign",
            correlation_id="c-1",
        ),
    )
    assert local_broker.message_counts(QUEUE)["active"] == 1
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        (msg,) = receive_n(receiver, 1)
        assert b"".join(msg.body) == b'{"user": "u1"}'
        assert msg.message_id == "m-1"
        assert msg.application_properties == {b"kind": b"request"}
        assert msg.content_type == "application/json"
        assert msg.subject == "assign"
        assert msg.correlation_id == "c-1"
        assert msg.delivery_count == 0
        assert msg.sequence_number == 1
        assert msg.lock_token is not None
        assert msg.enqueued_time_utc is not None
        assert msg.locked_until_utc is not None
        assert msg.locked_until_utc > datetime.now(UTC) + timedelta(seconds=20)
        assert local_broker.message_counts(QUEUE)["locked"] == 1
        receiver.complete_message(msg)
    assert local_broker.message_counts(QUEUE) == EMPTY


def test_batch_send_of_several_hundred(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    with sb_client.get_queue_sender(QUEUE) as sender:
        batch = sender.create_message_batch()
        for i in range(400):
            batch.add_message(ServiceBusMessage(f"m{i}", application_properties={"i": i}))
        sender.send_messages(batch)
        sender.send_messages([ServiceBusMessage(f"list{i}") for i in range(100)])
    assert local_broker.message_counts(QUEUE)["active"] == 500
    with sb_client.get_queue_receiver(QUEUE, prefetch_count=100) as receiver:
        got = receive_n(receiver, 500, timeout=60)
        assert [str(m) for m in got[:3]] == ["m0", "m1", "m2"]
        assert (got[399].application_properties or {})[b"i"] == 399
        assert str(got[-1]) == "list99"
        for msg in got:
            receiver.complete_message(msg)
    assert local_broker.message_counts(QUEUE)["active"] == 0


def test_abandon_redelivers_with_incremented_delivery_count(
    sb_client: ServiceBusClient,
) -> None:
    send(sb_client, QUEUE, ServiceBusMessage("again"))
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        (first,) = receive_n(receiver, 1)
        receiver.abandon_message(first)
        (second,) = receive_n(receiver, 1)
        assert second.sequence_number == first.sequence_number
        assert second.delivery_count == (first.delivery_count or 0) + 1
        receiver.complete_message(second)


def test_dead_letter_reason_and_description_reach_the_dlq(
    local_broker: LocalBroker, sb_client: ServiceBusClient
) -> None:
    send(sb_client, QUEUE, ServiceBusMessage("poison", application_properties={"k": "v"}))
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        (msg,) = receive_n(receiver, 1)
        receiver.dead_letter_message(msg, reason="SchemaValidationFailed", error_description="missing user_id")
    counts = local_broker.message_counts(QUEUE)
    assert counts["active"] == 0
    assert counts["dead_letter"] == 1
    with sb_client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        (dead,) = receive_n(dlq, 1)
        assert str(dead) == "poison"
        assert dead.dead_letter_reason == "SchemaValidationFailed"
        assert dead.dead_letter_error_description == "missing user_id"
        assert dead.dead_letter_source == QUEUE
        assert (dead.application_properties or {})[b"k"] == b"v"
        dlq.complete_message(dead)
    assert local_broker.message_counts(QUEUE)["dead_letter"] == 0


def test_max_delivery_count_dead_letters(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(sb_client, "three-deliveries", ServiceBusMessage("unlucky"))
    with sb_client.get_queue_receiver("three-deliveries") as receiver:
        for attempt in range(3):
            (msg,) = receive_n(receiver, 1)
            assert msg.delivery_count == attempt
            receiver.abandon_message(msg)
        assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
    assert local_broker.message_counts("three-deliveries")["dead_letter"] == 1
    with sb_client.get_queue_receiver("three-deliveries", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        (dead,) = receive_n(dlq, 1)
        assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
        dlq.complete_message(dead)


def test_lock_expiry_redelivers_and_old_lock_is_lost(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(sb_client, "short-lock", ServiceBusMessage("slow"))
    with sb_client.get_queue_receiver("short-lock") as receiver:
        (first,) = receive_n(receiver, 1)
        # Comes back only once the 1 s lock has lapsed: the receive waits for that, however long it takes.
        (second,) = receive_n(receiver, 1)
        assert second.sequence_number == first.sequence_number
        assert second.delivery_count == 1
        with pytest.raises(MessageLockLostError):
            receiver.complete_message(first)
        receiver.complete_message(second)
    assert local_broker.message_counts("short-lock")["active"] == 0


def test_settling_through_management_after_lock_loss_is_lock_lost(
    local_broker: LocalBroker, sb_client: ServiceBusClient
) -> None:
    send(sb_client, "short-lock", ServiceBusMessage("slow"))
    with sb_client.get_queue_receiver("short-lock") as receiver:
        (msg,) = receive_n(receiver, 1)
        wait_for(lambda: local_broker.message_counts("short-lock")["locked"] == 0, what="the 1 s lock to lapse")
        # Bypass the SDK's client-side expiry check to exercise the broker's answer.
        msg._expiry = datetime.now(UTC) + timedelta(minutes=1)
        with pytest.raises(MessageLockLostError):
            receiver.renew_message_lock(msg)
        with pytest.raises(MessageLockLostError):
            receiver.complete_message(msg)


def test_renew_message_lock(sb_client: ServiceBusClient) -> None:
    lock = 5.0
    send(sb_client, "five-second-lock", ServiceBusMessage("keep"))
    with sb_client.get_queue_receiver("five-second-lock") as receiver:
        (msg,) = receive_n(receiver, 1)
        original = msg.locked_until_utc
        assert original is not None
        # A renewal every second (4 s of slack each on a busy machine) until held past the lock duration.
        for _ in range(int(lock) + 1):
            time.sleep(1)
            renewed = receiver.renew_message_lock(msg)
            assert renewed > original
        # Over 5 s after receipt with a 5 s lock: only the renewals kept it.
        receiver.complete_message(msg)
        assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []


def test_peek_messages(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(sb_client, QUEUE, *[ServiceBusMessage(f"p{i}") for i in range(5)])
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        peeked = receiver.peek_messages(max_message_count=3)
        assert [str(m) for m in peeked] == ["p0", "p1", "p2"]
        assert [m.sequence_number for m in peeked] == [1, 2, 3]
        more = receiver.peek_messages(max_message_count=10)
        assert [str(m) for m in more] == ["p3", "p4"]
        assert receiver.peek_messages(max_message_count=5, sequence_number=100) == []
    assert local_broker.message_counts(QUEUE)["active"] == 5
    assert local_broker.message_counts(QUEUE)["locked"] == 0


def test_defer_and_receive_deferred(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(sb_client, QUEUE, ServiceBusMessage("later"), ServiceBusMessage("now"))
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        first, second = receive_n(receiver, 2)
        seq = first.sequence_number
        assert seq is not None
        receiver.defer_message(first)
        receiver.complete_message(second)
        assert local_broker.message_counts(QUEUE)["deferred"] == 1
        assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []
        (deferred,) = receiver.receive_deferred_messages([seq])
        assert str(deferred) == "later"
        assert deferred.lock_token is not None
        receiver.complete_message(deferred)
    assert local_broker.message_counts(QUEUE) == EMPTY


def test_schedule_and_cancel_messages(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    with sb_client.get_queue_sender(QUEUE) as sender:
        (cancel_seq,) = sender.schedule_messages(ServiceBusMessage("cancelled"), datetime.now(UTC) + timedelta(hours=1))
        assert local_broker.message_counts(QUEUE)["scheduled"] == 1
        sender.cancel_scheduled_messages(cancel_seq)
        assert local_broker.message_counts(QUEUE)["scheduled"] == 0
        # AMQP carries milliseconds: compare with the time as the broker gets it.
        soon = (datetime.now(UTC) + timedelta(seconds=1.5)).replace(microsecond=0)
        (seq,) = sender.schedule_messages(ServiceBusMessage("scheduled"), soon)
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        (msg,) = receive_n(receiver, 1)
        # Enqueued no sooner than its time: the broker's own record, not a receive that must come up
        # empty first (on a busy machine the receiver's link can open after the time has passed).
        assert msg.enqueued_time_utc is not None
        assert msg.enqueued_time_utc >= soon
        assert str(msg) == "scheduled"
        assert msg.sequence_number == seq
        assert msg.scheduled_enqueue_time_utc is not None
        receiver.complete_message(msg)
    assert local_broker.message_counts(QUEUE)["scheduled"] == 0


def test_unknown_entity_is_not_found(sb_client: ServiceBusClient) -> None:
    with (
        pytest.raises(MessagingEntityNotFoundError),
        sb_client.get_queue_sender("no-such-queue") as sender,
    ):
        sender.send_messages(ServiceBusMessage("x"))
    with (
        pytest.raises(MessagingEntityNotFoundError),
        sb_client.get_queue_receiver("no-such-queue") as receiver,
    ):
        receiver.receive_messages(max_message_count=1, max_wait_time=1)
    with (
        pytest.raises(MessagingEntityNotFoundError),
        sb_client.get_subscription_receiver("events", "nope") as sub,
    ):
        sub.receive_messages(max_message_count=1, max_wait_time=1)


def test_topic_fan_out_with_sql_and_correlation_filters(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    with sb_client.get_topic_sender("events") as sender:
        sender.send_messages(
            [
                ServiceBusMessage("eu-x", application_properties={"region": "eu", "kind": "x"}),
                ServiceBusMessage("us-x", application_properties={"region": "us", "kind": "x"}),
                ServiceBusMessage("eu-y", application_properties={"region": "eu", "kind": "y"}),
                ServiceBusMessage("special", subject="special", application_properties={"kind": "x"}),
            ]
        )
    expected = {
        "all": ["eu-x", "us-x", "eu-y", "special"],
        "eu": ["eu-x"],
        "corr": ["special"],
    }
    for sub, bodies in expected.items():
        assert local_broker.message_counts(f"events/Subscriptions/{sub}")["active"] == len(bodies)
        with sb_client.get_subscription_receiver("events", sub) as receiver:
            got = receive_n(receiver, len(bodies))
            assert [str(m) for m in got] == bodies
            for msg in got:
                receiver.complete_message(msg)
            assert receiver.receive_messages(max_message_count=1, max_wait_time=0.5) == []


def test_subscription_dead_letter_queue(sb_client: ServiceBusClient) -> None:
    with sb_client.get_topic_sender("assignment-events") as sender:
        sender.send_messages(ServiceBusMessage("evt", message_id="e-1"))
    with sb_client.get_subscription_receiver("assignment-events", "audit") as receiver:
        (msg,) = receive_n(receiver, 1)
        receiver.dead_letter_message(msg, reason="Bad", error_description="bad event")
    with sb_client.get_subscription_receiver(
        "assignment-events", "audit", sub_queue=ServiceBusSubQueue.DEAD_LETTER
    ) as dlq:
        (dead,) = receive_n(dlq, 1)
        assert dead.dead_letter_reason == "Bad"
        dlq.complete_message(dead)
    with sb_client.get_subscription_receiver("assignment-events", "all") as other:
        (copy,) = receive_n(other, 1)
        assert copy.dead_letter_reason is None
        other.complete_message(copy)


def test_duplicate_detection(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(
        sb_client,
        "dedup",
        ServiceBusMessage("a", message_id="same"),
        ServiceBusMessage("b", message_id="same"),
        ServiceBusMessage("c", message_id="other"),
    )
    send(sb_client, "dedup", ServiceBusMessage("d", message_id="same"))
    assert local_broker.message_counts("dedup")["active"] == 2
    with sb_client.get_topic_sender("assignment-events") as sender:
        sender.send_messages(ServiceBusMessage("e", message_id="evt-1"))
        sender.send_messages(ServiceBusMessage("e", message_id="evt-1"))
    assert local_broker.message_counts("assignment-events/Subscriptions/all")["active"] == 1
    # Queues without duplicate detection keep every copy.
    send(sb_client, QUEUE, ServiceBusMessage("x", message_id="s"), ServiceBusMessage("y", message_id="s"))
    assert local_broker.message_counts(QUEUE)["active"] == 2


def test_receive_and_delete(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(sb_client, QUEUE, *[ServiceBusMessage(f"rd{i}") for i in range(3)])
    with sb_client.get_queue_receiver(QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        got = receive_n(receiver, 3)
        assert [str(m) for m in got] == ["rd0", "rd1", "rd2"]
        assert all(m.lock_token is None for m in got)
    assert local_broker.message_counts(QUEUE)["active"] == 0


# pyamqp abandons the broken socket without closing it; collect it here, where it is expected.
_SDK_LEAKS_DROPPED_SOCKETS = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _apply(marks: list[pytest.MarkDecorator]) -> Callable[[_F], _F]:
    def decorate(fn: _F) -> _F:
        for mark in marks:
            fn = mark(fn)
        return fn

    return decorate


@_apply(_SDK_LEAKS_DROPPED_SOCKETS)
def test_drop_connections_and_sdk_recovers(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    with (
        sb_client.get_queue_sender(QUEUE) as sender,
        sb_client.get_queue_receiver(QUEUE) as receiver,
    ):
        sender.send_messages(ServiceBusMessage("before"))
        (msg,) = receive_n(receiver, 1)
        receiver.complete_message(msg)
        assert local_broker.drop_connections() >= 2
        # Both long-lived handlers must notice the dead connection and reconnect by themselves.
        sender.send_messages(ServiceBusMessage("after"))
        (again,) = receive_n(receiver, 1, timeout=60, wait=5)
        assert str(again) == "after"
        receiver.complete_message(again)
    assert local_broker.message_counts(QUEUE)["active"] == 0
    gc.collect()


@_apply(_SDK_LEAKS_DROPPED_SOCKETS)
def test_drop_connections_while_holding_a_lock(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(sb_client, QUEUE, ServiceBusMessage("held"))
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        (msg,) = receive_n(receiver, 1)
        local_broker.drop_connections()
        # The link is gone, so the SDK falls back to $management with the lock token.
        receiver.complete_message(msg)
    assert local_broker.message_counts(QUEUE)["active"] == 0
    gc.collect()


def test_restart_on_same_port_keeps_state(broker_config: BrokerConfig) -> None:
    first = LocalBroker(broker_config).start()
    port = first.port
    try:
        with ServiceBusClient.from_connection_string(first.connection_string) as client:
            send(client, QUEUE, ServiceBusMessage("survivor"))
    finally:
        first.stop()
    with LocalBroker(port=port, state=first.state) as second:
        assert second.port == port
        assert second.message_counts(QUEUE)["active"] == 1
        with (
            ServiceBusClient.from_connection_string(second.connection_string) as client,
            client.get_queue_receiver(QUEUE) as receiver,
        ):
            (msg,) = receive_n(receiver, 1)
            assert str(msg) == "survivor"
            receiver.complete_message(msg)
            send(client, QUEUE, ServiceBusMessage("next"))
            (nxt,) = receive_n(receiver, 1)
            assert nxt.sequence_number == 2
            receiver.complete_message(nxt)


def test_default_config_entities() -> None:
    config = BrokerConfig.default()
    assert [q.name for q in config.queues] == ["assignment-requests", "assignment-replies"]
    assert config.queues[0].properties.lock_duration == 30.0
    assert config.queues[0].properties.max_delivery_count == 10
    (topic,) = config.topics
    assert topic.name == "assignment-events"
    assert topic.properties.requires_duplicate_detection
    assert [s.name for s in topic.subscriptions] == ["all", "audit"]


def test_config_load_and_errors_name_file_and_field(tmp_path: Path) -> None:
    good = tmp_path / "Config.json"
    good.write_text(json.dumps(TEST_BROKER_CONFIG))
    config = BrokerConfig.load(good)
    assert {q.name for q in config.queues} == {
        "assignment-requests",
        "short-lock",
        "five-second-lock",
        "three-deliveries",
        "expiring",
        "dedup",
    }
    assert config.queues[1].properties.lock_duration == 1.0

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "UserConfig": {
                    "Namespaces": [{"Name": "ns", "Queues": [{"Name": "q", "Properties": {"LockDuration": "1m"}}]}]
                }
            }
        )
    )
    with pytest.raises(BrokerConfigError) as err:
        BrokerConfig.load(bad)
    assert str(bad) in str(err.value)
    assert "Queues[0].Properties.LockDuration" in str(err.value)
    with pytest.raises(BrokerConfigError, match=r"missing\.json"):
        BrokerConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize("properties", ["abc", 5, ["a", "b"]])
def test_a_correlation_filter_whose_properties_are_not_an_object_is_refused_by_path(
    tmp_path: Path, properties: object
) -> None:
    """The entities file names the field (``ab-worker broker --config``'s one-line error), instead of the
    broker failing to start with Python's 'dictionary update sequence element #0 has length 1'."""
    rule = {"Name": "r", "Properties": {"FilterType": "Correlation", "CorrelationFilter": {"Properties": properties}}}
    topic = {"Name": "t", "Subscriptions": [{"Name": "s", "Rules": [rule]}]}
    path = tmp_path / "entities.json"
    path.write_text(json.dumps({"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": [], "Topics": [topic]}]}}))
    where = r"Topics\[0\]\.Subscriptions\[0\]\.Rules\[0\]\.Properties\.CorrelationFilter\.Properties"
    with pytest.raises(BrokerConfigError, match=rf"entities\.json: .*{where}: expected an object"):
        BrokerConfig.load(path)


def test_expired_messages_are_dead_lettered_or_dropped(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    send(sb_client, "expiring", ServiceBusMessage("stale"))
    send(sb_client, QUEUE, ServiceBusMessage("short", time_to_live=timedelta(seconds=1)))
    # The broker expires messages on its tick: wait for it, not for 1.3 s and hope it ran.
    wait_for(lambda: local_broker.message_counts("expiring")["dead_letter"] == 1, what="the stale message to expire")
    wait_for(lambda: local_broker.message_counts(QUEUE)["active"] == 0, what="the short-lived message to expire")
    assert local_broker.message_counts("expiring")["active"] == 0
    assert local_broker.message_counts("expiring")["dead_letter"] == 1
    assert local_broker.message_counts(QUEUE) == EMPTY
    with sb_client.get_queue_receiver("expiring", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        (dead,) = receive_n(dlq, 1)
        assert dead.dead_letter_reason == "TTLExpiredException"
        dlq.complete_message(dead)


def test_large_message_round_trip(sb_client: ServiceBusClient) -> None:
    payload = bytes(range(256)) * 2000  # 512 KB: several AMQP frames each way
    send(sb_client, QUEUE, ServiceBusMessage(payload))
    with sb_client.get_queue_receiver(QUEUE) as receiver:
        (msg,) = receive_n(receiver, 1)
        assert b"".join(msg.body) == payload
        receiver.complete_message(msg)


class Props:
    """What a subscription filter sees of a message: application properties and a label."""

    def __init__(self, label: str | None = None, **properties: Any) -> None:
        self.label = label
        self.application_properties = properties

    def system_property(self, index: int) -> Any:
        from adapters.local.broker.filters import SYSTEM_PROPERTIES

        return self.label if index == SYSTEM_PROPERTIES["label"] else None


def test_unsupported_sql_filter_warns_and_matches_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from adapters.local.broker.config import RuleConfig
    from adapters.local.broker.filters import compile_rules, parse_sql

    both = parse_sql("a = 'x' AND b = 2")
    assert both is not None
    assert both(Props(a="x", b=2))
    assert not both(Props(a="x", b=3))
    assert not both(Props(a="y", b=2))
    assert not both(Props(a="x"))
    label = parse_sql("sys.Label = 'special'")
    assert label is not None
    assert label(Props(label="special"))
    assert not label(Props(label="plain", a="special"))
    always = parse_sql("1=1")
    assert always is not None
    assert always(Props())
    never = parse_sql("1=2")
    assert never is not None
    assert not never(Props(a="x"))
    assert parse_sql("a = 'x' OR b = 'y'") is None
    assert parse_sql("a LIKE 'x%'") is None
    assert parse_sql("a > 3") is None
    with caplog.at_level("WARNING"):
        predicate = compile_rules((RuleConfig("r", sql="a LIKE 'x%'"),), "t/Subscriptions/s")
    assert predicate is None
    assert "not supported" in caplog.text


def test_serve_prints_connection_string_and_stops_on_sigterm(tmp_path: Path) -> None:
    """``ab-worker broker`` prints its connection string, serves the SDK, and exits 0 on SIGTERM."""
    config = tmp_path / "Config.json"
    config.write_text(json.dumps(TEST_BROKER_CONFIG))
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "broker", "--port", "0", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("Endpoint=sb://127.0.0.1:")
        assert "UseDevelopmentEmulator=true" in line
        with ServiceBusClient.from_connection_string(line) as client:
            send(client, "short-lock", ServiceBusMessage("via serve"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_serve_reports_bad_config(tmp_path: Path) -> None:
    """A broken entities file is one error line naming it, exit 2."""
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    result = subprocess.run(
        [sys.executable, "-m", "worker", "broker", "--port", "0", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert result.returncode == 2
    assert "broken.json" in result.stderr


def test_competing_consumers_share_a_queue(local_broker: LocalBroker, sb_client: ServiceBusClient) -> None:
    total = 300
    with sb_client.get_queue_sender(QUEUE) as sender:
        sender.send_messages([ServiceBusMessage(f"c{i}") for i in range(total)])
    seen: list[list[str]] = [[], []]
    # Each consumer holds its first batch until the other has one too, so both take part however
    # slowly the second link opens; they stop once every message is seen, not after an idle spell.
    both_started = threading.Barrier(2, timeout=60)
    done = threading.Event()

    def consume(index: int) -> None:
        with (
            ServiceBusClient.from_connection_string(local_broker.connection_string) as client,
            client.get_queue_receiver(QUEUE) as receiver,
        ):
            started = False
            while not done.is_set():
                batch = receiver.receive_messages(max_message_count=20, max_wait_time=0.5)
                if batch and not started:
                    both_started.wait()
                    started = True
                for msg in batch:
                    seen[index].append(str(msg))
                    receiver.complete_message(msg)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(seen[0]) + len(seen[1]) >= total, what=f"the consumers to see {total} messages")
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=40)
    everything = seen[0] + seen[1]
    assert len(everything) == total
    assert set(everything) == {f"c{i}" for i in range(total)}
    assert seen[0]
    assert seen[1]
    assert local_broker.message_counts(QUEUE)["active"] == 0


@_apply(_SDK_LEAKS_DROPPED_SOCKETS)
def test_restart_same_broker_and_long_lived_handlers_reconnect(broker_config: BrokerConfig) -> None:
    broker = LocalBroker(broker_config).start()
    port = broker.port
    try:
        with (
            ServiceBusClient.from_connection_string(
                broker.connection_string, retry_total=5, retry_backoff_factor=0.2, retry_backoff_max=1
            ) as client,
            client.get_queue_sender(QUEUE) as sender,
            client.get_queue_receiver(QUEUE) as receiver,
        ):
            sender.send_messages(ServiceBusMessage("one"))
            (first,) = receive_n(receiver, 1)
            receiver.complete_message(first)
            broker.stop()
            broker.start()
            assert broker.port == port
            sender.send_messages(ServiceBusMessage("two"))
            (second,) = receive_n(receiver, 1, timeout=60, wait=5)
            assert str(second) == "two"
            receiver.complete_message(second)
    finally:
        broker.stop()
    gc.collect()
