"""What the Service Bus adapter assumes of the pinned SDK's internals, checked against the real SDK.

Each private access of :mod:`adapters.servicebus.settle` and :mod:`adapters.servicebus.mgmt` has its
shape pinned here, on the embedded broker: an SDK upgrade that changes one fails this file first
(the adapter itself fails closed, with a WARNING, see tests/unit/test_sdk_guards.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusConnectionError

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.servicebus import send_requests
from adapters.servicebus.mgmt import renew_locks, settle_by_lock_token, top_up_management_credit
from adapters.servicebus.settle import link_identity, on_current_link, stamp_link

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

QUEUE = "contract"
CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "contract",
                "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 1, "LockDuration": "PT30S"}}],
                "Topics": [],
            }
        ]
    }
}


@pytest.fixture
def receiver() -> Iterator[tuple[LocalBroker, ServiceBusReceiver]]:
    """A real SDK receiver (retries on) on the embedded broker holding four messages."""
    with (
        LocalBroker(BrokerConfig.from_dict(CONFIG)) as broker,
        ServiceBusClient.from_connection_string(broker.connection_string, retry_total=3) as client,
    ):
        send_requests(client, QUEUE, [json.dumps({"i": i}).encode() for i in range(4)], message_ids=list("abcd"))
        with client.get_queue_receiver(QUEUE) as sdk_receiver:
            yield broker, sdk_receiver


def receive(receiver: ServiceBusReceiver, count: int) -> list:
    got: list = []
    for _ in range(20):
        try:
            more = receiver.receive_messages(max_message_count=count - len(got), max_wait_time=2)
        except ServiceBusConnectionError:
            continue  # the connection was dropped: the next call reconnects this receiver
        stamp_link(receiver, more)
        got.extend(more)
        if len(got) == count:
            return got
    pytest.fail(f"received {len(got)} of {count}")


def test_a_reconnect_replaces_the_handler_and_its_link(receiver: tuple[LocalBroker, ServiceBusReceiver]) -> None:
    """The SDK reconnects the same receiver object on a new handler with a new link: old messages read as stale."""
    broker, sdk = receiver
    old = receive(sdk, 2)
    identity = link_identity(sdk)
    assert identity is not None
    assert all(part is not None for part in identity)
    assert on_current_link(sdk, old[0]) is True
    broker.drop_connections()
    new = receive(sdk, 2)  # the SDK opens a new connection under the same receiver object
    handler, link = link_identity(sdk) or (None, None)
    assert handler is not identity[0]
    assert link is not identity[1]
    assert [on_current_link(sdk, m) for m in old + new] == [False, False, True, True]
    # The old link's messages are settled by lock token over the new connection's management link.
    settle_by_lock_token(sdk, "complete", old)
    settle_by_lock_token(sdk, "dead-letter", new[:1], reason="R", description="D")
    counts = broker.message_counts(QUEUE)
    assert (counts["active"], counts["locked"], counts["dead_letter"]) == (1, 1, 1)  # active counts the locked one


def test_bulk_renewal_and_the_management_credit_have_the_expected_shape(
    receiver: tuple[LocalBroker, ServiceBusReceiver],
) -> None:
    """``_renew_locks`` answers an expiry per token; the management response link's credit can be read and topped up."""
    _, sdk = receiver
    held = receive(sdk, 4)
    before = [m.locked_until_utc for m in held]
    renew_locks(sdk, held, timeout=10)
    assert all(m.locked_until_utc is not None and m.locked_until_utc >= b for m, b in zip(held, before, strict=True))
    (operation,) = sdk._handler._mgmt_links.values()  # type: ignore[union-attr]
    response_link = operation._mgmt_link._response_link
    assert response_link.current_link_credit == response_link.link_credit - 1
    response_link.current_link_credit = 10  # as if nearly spent
    top_up_management_credit(sdk)
    assert response_link.current_link_credit == response_link.link_credit
    renew_locks(sdk, held, timeout=10)  # still answered after the top-up
