"""Settling a message on a link it did not arrive on must never complete another message.

AMQP delivery ids are per link and start again at 0 on a new one. After a connection loss the
source receives on a new link, so a message from the old link and a new message can carry the same
delivery id: settling the old one by id on the new link would complete the new one, whose event was
never published — a lost request. Found by test_broker_restart_mid_run_loses_nothing, intermittently.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from azure.servicebus import ServiceBusClient

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.servicebus import ServiceBusAuth, ServiceBusSource, create_client, send_requests
from tests.waiting import wait_for

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
                "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 10, "LockDuration": "PT30S"}}],
                "Topics": [],
            }
        ]
    }
}


def received(source: ServiceBusSource, count: int) -> list:
    batch: list = []
    deadline_batches = 50
    while len(batch) < count and deadline_batches:
        # The first receive after a drop fails (TransientError) and rebuilds the receiver.
        with contextlib.suppress(Exception):
            batch.extend(source.receive(count - len(batch), 1.0))
        deadline_batches -= 1
    assert len(batch) == count
    return batch


@pytest.mark.parametrize("how", ["range", "one_by_one"])
def test_old_link_messages_are_not_settled_on_the_new_link(how: str) -> None:
    """After a reconnect, completing the old batch reports it lost and leaves the new batch untouched."""
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
            if how == "range":
                lost = list(source.complete_batch(old))
            else:
                lost = []
                for delivery in old:
                    try:
                        source.complete(delivery)
                    except Exception:
                        lost.append(delivery)
            assert sorted(d.message_id for d in lost) == sorted(d.message_id for d in old)
            # The new batch is still locked by us, not completed behind our back ...
            assert broker.message_counts(QUEUE)["active"] == 10
            # ... and completes normally.
            assert list(source.complete_batch(new)) == []
            wait_for(lambda: broker.message_counts(QUEUE)["active"] == 5, 10, "the old batch alone left")
        finally:
            source.close()
            sb.close()
