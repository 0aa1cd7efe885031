"""The publisher classifies every failure: transient (retry; nothing accepted is sent twice) or permanent
for the events concerned (PublishRejected naming them; every other event accepted, once).

Real SDK against the embedded broker; faults are injected with ``LocalBroker.refuse_sends``, which
rejects transfers with the AMQP error condition Azure uses, so the SDK raises the same exception class
it raises against Azure. The topic runs without duplicate detection, so a re-sent event would show.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode, ServiceBusSubQueue

from adapters.local.broker import LocalBroker
from adapters.memory import MemorySink
from adapters.servicebus import ServiceBusAuth, ServiceBusPublisher, create_client, send_requests
from tests.integration.emulator import emulator_config, queue, running_broker, topic
from tests.waiting import collect
from worker.bootstrap import bootstrap
from worker.cli import main
from worker.cli.common import ExitStatus
from worker.domain.errors import DeadLetterReason, PublishRejected, TransientError
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import event_id_for
from worker.service.ports import OutboundEvent
from worker.service.pump import PumpConfig, settled
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC, REPLIES = "assignment-requests", "assignment-events", "replies"
QUEUES = [queue(QUEUE, MaxDeliveryCount=10, LockDuration="PT30S"), queue(REPLIES)]
CONFIG = emulator_config(QUEUES, [topic(TOPIC)])


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """The embedded broker: requests queue, a replies queue, the topic without duplicate detection."""
    with running_broker(CONFIG) as running:
        yield running


@pytest.fixture
def publisher(broker: LocalBroker) -> Iterator[ServiceBusPublisher]:
    """The real publisher, with short SDK retries, refusing replies to the requests queue."""
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    publisher = ServiceBusPublisher(client, TOPIC, requests_queue=QUEUE)
    try:
        yield publisher
    finally:
        publisher.close()
        client.close()


def event(message_id: str, reply_to: str | None = REPLIES, size: int = 0) -> OutboundEvent:
    """An event (and reply); ``size`` pads the body to about that many bytes."""
    body = json.dumps({"event_id": message_id, "pad": "x" * size}).encode()
    return OutboundEvent(body, message_id, "corr", {"event_type": "assignment"}, reply_to=reply_to)


def received(broker: LocalBroker, entity: str) -> Counter[str]:
    """Message ids on a queue or subscription (removed as read), with how often each arrived.

    The broker counts them first (a duplicate is a message too), so the read waits for exactly
    those instead of stopping at the first receive that comes back empty on a busy machine.
    """
    path = f"{TOPIC}/Subscriptions/all" if entity == TOPIC else entity
    present = broker.message_counts(path)["active"]
    ids: Counter[str] = Counter()
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        receiver = (
            client.get_subscription_receiver(TOPIC, "all", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
            if entity == TOPIC
            else client.get_queue_receiver(entity, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
        )
        with receiver:
            messages = collect(
                lambda: receiver.receive_messages(max_message_count=100, max_wait_time=1),
                present,
                what=f"the {present} messages on {path}",
            )
            ids.update(str(m.message_id) for m in messages)
    return ids


# -- transient -----------------------------------------------------------------------------------

TRANSIENT = [
    # (entity refusing, AMQP condition, the SDK exception class it becomes)
    (REPLIES, "com.microsoft:server-busy", "ServiceBusServerBusyError"),
    (REPLIES, "com.microsoft:timeout", "OperationTimeoutError"),
    (REPLIES, "com.microsoft:entity-disabled", "MessagingEntityDisabledError"),
    (REPLIES, "amqp:resource-limit-exceeded", "ServiceBusQuotaExceededError"),
    (TOPIC, "com.microsoft:server-busy", "ServiceBusServerBusyError"),
    (TOPIC, "amqp:not-found", "MessagingEntityNotFoundError"),
    (TOPIC, "amqp:unauthorized-access", "ServiceBusAuthorizationError"),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("entity", "condition", "sdk_error"), TRANSIENT)
def test_transient_failure_is_retried_and_nothing_accepted_is_sent_twice(
    broker: LocalBroker, publisher: ServiceBusPublisher, entity: str, condition: str, sdk_error: str
) -> None:
    """Busy, slow, full or disabled, or any failure of the topic itself: TransientError; the retry sends the rest."""
    events = [event(f"e{i}") for i in range(6)]
    broker.refuse_sends(entity, condition)
    with pytest.raises(TransientError) as caught:
        publisher.publish(events)
    assert sdk_error in str(caught.value)
    assert condition in str(caught.value)
    broker.clear_faults()
    publisher.publish(events)
    expected = Counter(e.message_id for e in events)
    assert received(broker, TOPIC) == expected
    assert received(broker, REPLIES) == expected


@pytest.mark.timeout(90)
def test_connection_loss_is_transient_and_the_retry_resends_nothing_accepted(
    broker: LocalBroker, publisher: ServiceBusPublisher
) -> None:
    """The broker goes away mid-publish (after the topic took its events): TransientError; retry completes once."""
    events = [event(f"e{i}") for i in range(4)]
    broker.refuse_sends(REPLIES, "com.microsoft:server-busy")
    with pytest.raises(TransientError):
        publisher.publish(events)
    port, state = broker.port, broker.state
    broker.stop()
    with pytest.raises(TransientError):
        publisher.publish(events)
    with LocalBroker(port=port, state=state) as back:
        back.clear_faults()
        publisher.publish(events)
        publisher.close()  # while the broker is up, so the SDK closes its socket cleanly
        assert received(back, TOPIC) == Counter(e.message_id for e in events)
        assert received(back, REPLIES) == Counter(e.message_id for e in events)


# -- permanent for the events concerned ----------------------------------------------------------

PERMANENT = {
    # case: (reply_to of the two refused events, condition injected on REPLIES or None, words in the reason,
    #        whether the refused events reached the topic)
    "entity-not-found": ("no-such-queue", None, "does not exist", True),
    "unauthorised": (REPLIES, "amqp:unauthorized-access", "unauthorised", True),
    "not-allowed": (REPLIES, "amqp:not-allowed", "not allowed", True),
    "other-namespace": ("sb://elsewhere.servicebus.windows.net/replies", None, "another namespace", False),
    "subscription": (f"{TOPIC}/Subscriptions/all", None, "not a queue or topic", False),
    "bad-name": ("replies with spaces", None, "not a queue or topic", False),
    "requests-queue": (QUEUE, None, "requests queue", False),
    "requests-queue-address": ("sb://127.0.0.1/Assignment-Requests", None, "requests queue", False),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", sorted(PERMANENT))
def test_reply_refused_for_good_rejects_only_those_events(
    broker: LocalBroker, publisher: ServiceBusPublisher, case: str
) -> None:
    """PublishRejected names exactly the events whose reply can never go; every other one was accepted, once."""
    reply_to, condition, words, on_topic = PERMANENT[case]
    good = [event(f"good{i}") for i in range(4)]
    bad = [event(f"bad{i}", reply_to=reply_to) for i in range(2)]
    if condition is not None:
        good = [event(f"good{i}", reply_to=None) for i in range(4)]  # REPLIES itself refuses
        broker.refuse_sends(REPLIES, condition)
    with pytest.raises(PublishRejected) as caught:
        publisher.publish([good[0], bad[0], *good[1:3], bad[1], good[3]])
    rejected = caught.value.rejected
    assert set(rejected) == {e.message_id for e in bad}
    for error in rejected.values():
        assert error.reason is DeadLetterReason.REPLY_UNDELIVERABLE
        assert words in error.description
        assert reply_to in error.description
    topic = received(broker, TOPIC)
    assert topic == Counter(e.message_id for e in good + (bad if on_topic else []))


@pytest.fixture
def broker_with_other_replies() -> Iterator[LocalBroker]:
    """Like ``broker``, plus an ``other-replies`` queue."""
    with running_broker(emulator_config([*QUEUES, queue("other-replies")], [topic(TOPIC)])) as running:
        yield running


@pytest.mark.timeout(90)
def test_refused_reply_entity_leaves_replies_to_other_entities_delivered(
    broker_with_other_replies: LocalBroker,
) -> None:
    """Replies are sent per entity: one forbidden entity does not stop the replies to another."""
    broker = broker_with_other_replies
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    publisher = ServiceBusPublisher(client, TOPIC, requests_queue=QUEUE)
    try:
        broker.refuse_sends(REPLIES, "amqp:unauthorized-access")
        events = [event("a", "other-replies"), event("b", REPLIES), event("c", "other-replies")]
        with pytest.raises(PublishRejected) as caught:
            publisher.publish(events)
    finally:
        publisher.close()
        client.close()
    assert set(caught.value.rejected) == {"b"}
    assert received(broker, "other-replies") == Counter({"a": 1, "c": 1})
    assert received(broker, TOPIC) == Counter({"a": 1, "b": 1, "c": 1})


@pytest.mark.timeout(90)
def test_event_too_large_for_the_entity_is_rejected_alone(broker: LocalBroker, publisher: ServiceBusPublisher) -> None:
    """An event over the link's message size (1 MiB here) is EventTooLarge naming size and limit; the rest go once."""
    events = [event("small0"), event("huge", size=1_100_000), event("small1"), event("small2")]
    with pytest.raises(PublishRejected) as caught:
        publisher.publish(events)
    (error,) = caught.value.rejected.values()
    assert set(caught.value.rejected) == {"huge"}
    assert error.reason is DeadLetterReason.EVENT_TOO_LARGE
    assert "1048576" in error.description
    assert str(len(events[1].body)) in error.description
    expected = Counter({"small0": 1, "small1": 1, "small2": 1})
    assert received(broker, TOPIC) == expected
    assert received(broker, REPLIES) == expected


@pytest.mark.timeout(90)
def test_topic_refusing_one_transfer_as_too_large_rejects_that_event_alone(
    broker: LocalBroker, publisher: ServiceBusPublisher
) -> None:
    """The broker refuses a batch as too large (limits differ from what the SDK assumed): the culprit is found."""
    broker.refuse_sends(TOPIC, "amqp:link:message-size-exceeded", times=2)
    events = [event(f"e{i}", reply_to=None) for i in range(3)]
    with pytest.raises(PublishRejected) as caught:
        publisher.publish(events)
    # The batch was refused, then the first event sent alone was refused too: it is the one rejected.
    assert set(caught.value.rejected) == {"e0"}
    assert received(broker, TOPIC) == Counter({"e1": 1, "e2": 1})


# -- end to end with the pump --------------------------------------------------------------------

REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})


@pytest.mark.timeout(120)
def test_requests_whose_replies_can_never_go_are_dead_lettered_alone(broker: LocalBroker) -> None:
    """Undeliverable replies (missing entity, the requests queue) dead-letter their request; the batch completes."""
    replies = {f"ok{i}": REPLIES for i in range(5)} | {"missing": "no-such-queue", "loop": QUEUE}
    bodies = [json.dumps({"user_id": f"U-{m}", "experiment_id": "exp_001"}).encode() for m in replies]
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, bodies, message_ids=list(replies))
    _set_reply_to_on_queue(broker, replies)
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    try:
        pump = bootstrap(
            WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC, prefetch=20),
            registry=lambda: REGISTRY,
            client=client,
            sink=MemorySink(max_rows=50),
            config=PumpConfig(max_batch=20, max_wait=2.0, min_backoff=0.05, max_backoff=0.2),
        )
        stats = pump.run(until=settled(len(replies)))
    finally:
        client.close()
    assert stats.completed == 5
    assert stats.dead_letters == {"ReplyUndeliverable": 2}
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as check,
        check.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver,
    ):
        messages = collect(lambda: receiver.receive_messages(10, max_wait_time=2), 2, what="the 2 dead letters")
        dead = {str(m.message_id): m.dead_letter_reason for m in messages}
    assert dead == {"missing": "ReplyUndeliverable", "loop": "ReplyUndeliverable"}
    topic = received(broker, TOPIC)
    assert all(n == 1 for n in topic.values()), topic
    assert set(received(broker, REPLIES)) == {event_id_for(f"ok{i}") for i in range(5)}


def _set_reply_to_on_queue(broker: LocalBroker, replies: dict[str, str]) -> None:
    """Re-send the queued requests with their reply_to set (send_requests has no reply_to)."""
    from azure.servicebus import ServiceBusMessage

    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        with client.get_queue_receiver(QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
            messages = collect(
                lambda: receiver.receive_messages(len(replies), max_wait_time=2), len(replies), what="the requests"
            )
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(
                [
                    ServiceBusMessage(
                        b"".join(m.body), message_id=str(m.message_id), reply_to=replies[str(m.message_id)]
                    )
                    for m in messages
                ]
            )


# -- the command line reports translated errors in one line --------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args",
    [
        ["publish", "--queue", "no-such-queue", "--experiment", "exp_001", "--user", "U1"],
        ["dlq", "peek", "--entity", "no-such-queue"],
    ],
)
def test_cli_reports_a_refused_entity_in_one_line(
    broker: LocalBroker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """SDK errors reach the CLI as ours: exit 5, one line naming what failed, no traceback."""
    monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", broker.connection_string)
    code = main(args)
    err = capsys.readouterr().err
    assert code == ExitStatus.UNREACHABLE
    assert len(err.strip().splitlines()) == 1, err
    assert "MessagingEntityNotFoundError" in err
    assert "Traceback" not in err
    assert "SharedAccessKey" not in err
