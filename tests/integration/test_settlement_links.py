"""Messages from a replaced link: never settled by delivery id on the new link, always by lock token.

AMQP delivery ids are per link and start again at 0 on a new one. After a connection loss the
source receives on a new link, so a message from the old link and a new message can carry the same
delivery id: settling the old one by id on the new link would complete the new one, whose event was
never published — a lost request. Found by test_broker_restart_mid_run_loses_nothing, intermittently.

Service Bus settles a message of a non-session entity by its lock token over the management link
whatever link it came on, while the lock holds (issue 16 §1): the old batch is completed, abandoned
or dead-lettered that way instead of waiting out its lock and burning a delivery count. The broker
runs with a max delivery count of 1, so a burned count shows as a dead letter.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusSubQueue

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.local.faultproxy import FaultProxy
from adapters.servicebus import ServiceBusAuth, ServiceBusSource, create_client, send_requests
from tests.waiting import wait_for
from worker.domain.errors import TransientError
from worker.service.ports import Delivery, SettlementLostError

pytestmark = [
    pytest.mark.integration,
    # The dropped connection's socket is left to the garbage collector by the SDK.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

QUEUE = "assignment-requests"
CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "links",
                "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 1, "LockDuration": "PT30S"}}],
                "Topics": [],
            }
        ]
    }
}


def received(source: ServiceBusSource, count: int) -> list:
    batch: list = []

    def arrived() -> bool:
        # The first receive after a drop fails (TransientError) and rebuilds the receiver.
        with contextlib.suppress(Exception):
            batch.extend(source.receive(count - len(batch), 1.0))
        return len(batch) >= count

    wait_for(arrived, 60, f"{count} messages", interval=0, detail=lambda: f"{len(batch)} arrived")
    assert len(batch) == count
    return batch


@pytest.fixture
def two_links() -> Iterator[tuple[LocalBroker, ServiceBusSource, list[Delivery], list[Delivery]]]:
    """A source holding five messages from a dropped link and five from the link that replaced it."""
    with LocalBroker(BrokerConfig.from_dict(CONFIG)) as broker:
        with ServiceBusClient.from_connection_string(broker.connection_string) as client:
            bodies = [json.dumps({"user_id": f"U{i}", "experiment_id": "e"}).encode() for i in range(10)]
            send_requests(client, QUEUE, bodies, message_ids=[f"m{i}" for i in range(10)])
        sb = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
        source = ServiceBusSource(sb, QUEUE)
        try:
            old = received(source, 5)
            broker.drop_connections()
            new = received(source, 5)
            assert {d.message_id for d in old}.isdisjoint(d.message_id for d in new)
            yield broker, source, old, new
        finally:
            source.close()
            sb.close()


@pytest.mark.parametrize("how", ["range", "one_by_one"])
def test_old_link_messages_are_completed_by_lock_token_and_the_new_link_is_untouched(
    two_links: tuple[LocalBroker, ServiceBusSource, list[Delivery], list[Delivery]], how: str
) -> None:
    """After a reconnect the old batch completes (by lock token), the new batch stays locked, nothing burns a count."""
    broker, source, old, new = two_links
    if how == "range":
        lost = list(source.complete_batch(old))
    else:
        lost = []
        for delivery in old:
            try:
                source.complete(delivery)
            except SettlementLostError:
                lost.append(delivery)
    assert lost == []
    assert source.settled_by_token == 5
    # The old batch is gone and the new one still locked by us, not completed behind our back ...
    assert broker.message_counts(QUEUE) == {**broker.message_counts(QUEUE), "active": 5, "locked": 5, "dead_letter": 0}
    # ... and completes normally, on its own link.
    assert list(source.complete_batch(new)) == []
    assert source.settled_by_token == 5
    wait_for(lambda: broker.message_counts(QUEUE)["active"] == 0, 30, "the new batch completed")
    assert broker.message_counts(QUEUE)["dead_letter"] == 0


def test_old_link_messages_are_dead_lettered_by_lock_token_with_their_reason(
    two_links: tuple[LocalBroker, ServiceBusSource, list[Delivery], list[Delivery]],
) -> None:
    """A poison message from a replaced link is dead-lettered with our reason, not MaxDeliveryCountExceeded."""
    broker, source, old, _ = two_links
    for delivery in old:
        source.dead_letter(delivery, "SchemaValidationFailed", f"bad {delivery.message_id}")
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq,
    ):
        dead = dlq.peek_messages(max_message_count=10)
    assert sorted((m.message_id, m.dead_letter_reason, m.dead_letter_error_description) for m in dead) == [
        (d.message_id, "SchemaValidationFailed", f"bad {d.message_id}") for d in sorted(old, key=lambda d: d.message_id)
    ]


def test_old_link_messages_are_abandoned_by_lock_token_at_once() -> None:
    """Abandoning a replaced link's message releases it now (one delivery counted), not after its 30 s lock."""
    config = json.loads(json.dumps(CONFIG).replace('"MaxDeliveryCount": 1', '"MaxDeliveryCount": 10'))
    with LocalBroker(BrokerConfig.from_dict(config)) as broker:
        with ServiceBusClient.from_connection_string(broker.connection_string) as client:
            bodies = [json.dumps({"user_id": f"U{i}", "experiment_id": "e"}).encode() for i in range(5)]
            send_requests(client, QUEUE, bodies, message_ids=[f"m{i}" for i in range(5)])
        sb = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
        source = ServiceBusSource(sb, QUEUE)
        try:
            old = received(source, 5)
            broker.drop_connections()
            for delivery in old:
                source.abandon(delivery)
            assert broker.message_counts(QUEUE)["locked"] == 0
            again = received(source, 5)
            assert sorted(d.message_id for d in again) == sorted(d.message_id for d in old)
            assert {d.delivery_count for d in again} == {1}
            assert list(source.complete_batch(again)) == []
        finally:
            source.close()
            sb.close()


@pytest.mark.timeout(120)
def test_messages_a_reset_receive_had_taken_delivery_of_are_kept_and_completed() -> None:
    """A reset mid-receive: what the SDK had buffered is returned next and completed by lock token, not left to lapse.

    The proxy resets the connection 4,000 bytes into a 150-message receive: some transfers have
    arrived (locked for us by the broker) when the receive fails, the rest were on the wire and are
    lost with it (those only the broker can release, when their lock lapses). Max delivery count 1:
    a kept message left to lapse would be a dead letter.
    """
    with LocalBroker(BrokerConfig.from_dict(CONFIG)) as broker, FaultProxy(broker.port) as proxy:
        with ServiceBusClient.from_connection_string(broker.connection_string) as client:
            bodies = [json.dumps({"user_id": f"U{i}", "experiment_id": "e"}).encode() for i in range(200)]
            send_requests(client, QUEUE, bodies, message_ids=[f"m{i}" for i in range(200)])
        auth = ServiceBusAuth(connection_string=proxy.connection_string(broker.connection_string))
        sb = create_client(auth, retry_total=1)
        source = ServiceBusSource(sb, QUEUE)
        try:
            first = received(source, 1)  # opens the link
            assert list(source.complete_batch(first)) == []
            proxy.reset_after(4000)
            with pytest.raises(TransientError):
                source.receive(150, 5.0)
            proxy.pass_through()
            kept_count = getattr(source, "kept_from_broken_receives", 0)
            assert kept_count > 0, "the reset left nothing buffered in the SDK"
            kept = source.receive(150, 1.0)
            assert len(kept) == kept_count
            before = broker.message_counts(QUEUE)
            assert list(source.complete_batch(kept)) == []
            assert source.settled_by_token == kept_count
            after = broker.message_counts(QUEUE)
            assert (after["active"], after["locked"]) == (before["active"] - kept_count, before["locked"] - kept_count)
            assert after["dead_letter"] == 0
        finally:
            source.close()
            sb.close()
