"""Each guard of :mod:`adapters.servicebus.internals` still holds on the installed azure-servicebus.

One test per guard (its ``sdk_guard`` marker names it), on the real SDK against the embedded
broker: the private surface is where the guard expects it *and* does what the worker relies on. An
SDK upgrade that moves one fails its test here first; ``make sdk-drill`` runs this file against the
newest release and reads, for each failing test, whether the guard tripped (it failed closed, one
WARNING, the fallback) or not (it is broken: it would have answered wrongly). What each guard does
when it trips is in tests/unit/test_sdk_guards.py.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import OperationTimeoutError, ServiceBusConnectionError, ServiceBusError

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.local.faultproxy import FaultProxy
from adapters.servicebus import send_requests
from adapters.servicebus.internals import (
    GUARDS,
    connection_socket,
    delivery_id,
    keep_unreturned_on_failure,
    link_identity,
    management_response_links,
    receive_linger,
    renew_locks,
    set_receive_linger,
    settle_by_lock_token,
    settle_range,
    stop_keep_alive,
    top_up_management_credit,
)
from adapters.servicebus.settle import on_current_link, stamp_link
from tests.integration.test_faults import DROPPED_CONNECTION_WARNINGS
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    *DROPPED_CONNECTION_WARNINGS,
]

QUEUE = "contract"
#: For what needs a receiver but no connection.
UNCONNECTED = "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"
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


@pytest.fixture(autouse=True)
def untripped() -> Iterator[None]:
    """Each test starts with no guard tripped and must end with none tripped: the surface held throughout."""
    GUARDS.reset()
    yield
    assert GUARDS.tripped == frozenset(), f"guards tripped: {sorted(GUARDS.tripped)}"


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """The embedded broker with one queue holding four messages."""
    with LocalBroker(BrokerConfig.from_dict(CONFIG)) as running:
        with ServiceBusClient.from_connection_string(running.connection_string) as client:
            send_requests(client, QUEUE, [json.dumps({"i": i}).encode() for i in range(4)], message_ids=list("abcd"))
        yield running


@pytest.fixture
def receiver(broker: LocalBroker) -> Iterator[ServiceBusReceiver]:
    """A real SDK receiver (retries on) on the embedded broker."""
    with (
        ServiceBusClient.from_connection_string(broker.connection_string, retry_total=3) as client,
        client.get_queue_receiver(QUEUE) as sdk_receiver,
    ):
        yield sdk_receiver


def receive(receiver: ServiceBusReceiver, count: int) -> list[ServiceBusReceivedMessage]:
    """Exactly ``count`` messages, each stamped with the link it arrived on."""
    got: list[ServiceBusReceivedMessage] = []

    def arrived() -> bool:
        try:
            more = receiver.receive_messages(max_message_count=count - len(got), max_wait_time=2)
        except (ServiceBusConnectionError, OperationTimeoutError):
            # The connection was dropped, or its new link took longer than the SDK waits to open (a
            # busy machine, right after a drop): the next call reconnects this receiver.
            return False
        stamp_link(receiver, more)
        got.extend(more)
        return len(got) >= count

    wait_for(arrived, 60, f"{count} messages", interval=0, detail=lambda: f"received {len(got)}")
    return got


def counts(broker: LocalBroker) -> tuple[int, int, int]:
    """(active, locked, dead-lettered) in the queue; active counts the locked ones."""
    found = broker.message_counts(QUEUE)
    return found["active"], found["locked"], found["dead_letter"]


@pytest.mark.sdk_guard("receive linger")
def test_the_receive_linger_is_the_attribute_the_sdks_receive_loop_reads() -> None:
    """It is set and read back, and the receiver's own receive code waits on it for further messages."""
    with ServiceBusClient.from_connection_string(UNCONNECTED) as client:
        receiver = client.get_queue_receiver(QUEUE)  # built lazily: nothing connects
        assert receive_linger(receiver) == pytest.approx(0.2)  # the SDK's default
        assert set_receive_linger(receiver, 0.005) is True
        assert receive_linger(receiver) == 0.005
        # The wait itself is timing (tests/integration/test_receive_gather.py measures its effect); that the
        # receive loop reads this attribute is a fact of the SDK's source.
        assert "self._further_pull_receive_timeout" in inspect.getsource(type(receiver))


@pytest.mark.sdk_guard("connection socket")
def test_the_connection_socket_is_the_one_connected_to_the_broker(
    broker: LocalBroker, receiver: ServiceBusReceiver
) -> None:
    """Connected: the socket whose peer is the broker; closed: no socket, quietly."""
    receive(receiver, 1)
    sock = connection_socket(receiver)
    assert sock is not None
    assert sock.getpeername()[1] == broker.port
    receiver.close()
    assert connection_socket(receiver) is None


@pytest.mark.sdk_guard("link identity")
def test_a_reconnect_replaces_the_handler_and_its_link(broker: LocalBroker, receiver: ServiceBusReceiver) -> None:
    """The SDK reconnects the same receiver object on a new handler with a new link: old messages read as stale."""
    old = receive(receiver, 2)
    identity = link_identity(receiver)
    assert identity is not None
    assert all(part is not None for part in identity)
    assert on_current_link(receiver, old[0]) is True
    broker.drop_connections()
    new = receive(receiver, 2)  # the SDK opens a new connection under the same receiver object
    handler, link = link_identity(receiver) or (None, None)
    assert handler is not identity[0]
    assert link is not identity[1]
    assert [on_current_link(receiver, m) for m in old + new] == [False, False, True, True]


@pytest.mark.sdk_guard("range settlement")
def test_one_disposition_completes_a_run_of_consecutive_deliveries(
    broker: LocalBroker, receiver: ServiceBusReceiver
) -> None:
    """Delivery ids are consecutive on one link; one disposition over first..last completes them all."""
    messages = sorted(receive(receiver, 4), key=delivery_id)
    ids = [delivery_id(m) for m in messages]
    assert ids == list(range(ids[0], ids[0] + 4))
    settle_range(receiver, messages, outcome_timeout=10)
    assert all(m.lock_token is None for m in messages)  # the SDK reads them as settled
    assert counts(broker) == (0, 0, 0)


@pytest.mark.sdk_guard("settlement by lock token")
def test_a_replaced_links_messages_settle_by_lock_token(broker: LocalBroker, receiver: ServiceBusReceiver) -> None:
    """Over the new connection's management link, by lock token: completed and dead-lettered with a reason."""
    old = receive(receiver, 2)
    broker.drop_connections()
    new = receive(receiver, 2)
    settle_by_lock_token(receiver, "complete", old)
    settle_by_lock_token(receiver, "dead-letter", new[:1], reason="R", description="D")
    assert all(m.lock_token is None for m in old + new[:1])
    assert counts(broker) == (1, 1, 1)


@pytest.mark.sdk_guard("bulk lock renewal")
def test_one_request_renews_many_locks(receiver: ServiceBusReceiver) -> None:
    """``renew-lock`` answers an expiry per token, and each message's ``locked_until_utc`` reads the new one."""
    held = receive(receiver, 4)
    before = [m.locked_until_utc for m in held]
    renew_locks(receiver, held, timeout=10)
    after = [m.locked_until_utc for m in held]
    assert all(a is not None and b is not None and a >= b for a, b in zip(after, before, strict=True))
    receiver.complete_message(held[0])  # the SDK's own settle accepts the renewed expiry


@pytest.mark.sdk_guard("management link credit")
def test_the_management_credit_can_be_read_and_topped_up(receiver: ServiceBusReceiver) -> None:
    """One response link per management operation; a nearly spent credit is granted again, and still answered."""
    held = receive(receiver, 4)
    renew_locks(receiver, held, timeout=10)
    (response_link,) = management_response_links(receiver)
    assert response_link.current_link_credit == response_link.link_credit - 1
    response_link.current_link_credit = 10  # as if nearly spent
    top_up_management_credit(receiver)
    assert response_link.current_link_credit == response_link.link_credit
    renew_locks(receiver, held, timeout=10)


@pytest.mark.sdk_guard("keeping a broken receive's messages")
@pytest.mark.timeout(120)
def test_a_reset_receive_hands_over_what_it_had_taken_delivery_of(broker: LocalBroker) -> None:
    """The proxy resets the connection mid-receive: the SDK's close of the broken handler hands its buffer to us.

    Each kept message is a received message with its lock token, still locked at the broker.
    """
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, [json.dumps({"pad": "x" * 200, "i": i}).encode() for i in range(150)])
    kept: list[ServiceBusReceivedMessage] = []
    with (
        FaultProxy(broker.port) as proxy,
        ServiceBusClient.from_connection_string(
            proxy.connection_string(broker.connection_string), retry_total=0
        ) as client,
        client.get_queue_receiver(QUEUE) as sdk_receiver,
    ):
        keep_unreturned_on_failure(sdk_receiver, lambda: True, kept.extend)
        receive(sdk_receiver, 1)  # opens the link
        proxy.reset_after(4000)
        with pytest.raises(ServiceBusError):
            sdk_receiver.receive_messages(max_message_count=150, max_wait_time=5)
        proxy.pass_through()
        assert kept, "the reset left nothing buffered in the SDK"
        assert all(isinstance(m, ServiceBusReceivedMessage) and m.lock_token is not None for m in kept)
        assert broker.message_counts(QUEUE)["locked"] >= len(kept) + 1


@pytest.mark.sdk_guard("no receiver keep-alive thread")
def test_a_receiver_without_keep_alive_opens_its_handler_with_no_thread_reading_its_connection(
    broker: LocalBroker,
) -> None:
    """At prefetch 0 the SDK starts a keep-alive thread per handler; with the guard none, and it still receives."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        with client.get_queue_receiver(QUEUE) as plain:
            receive(plain, 1)
            assert plain._handler._keep_alive_thread is not None, "the SDK no longer starts its keep-alive thread"
            assert plain._handler._keep_alive_thread.is_alive()
        quiet = client.get_queue_receiver(QUEUE)  # built lazily: its handler is made when it opens
        stop_keep_alive(quiet)
        with quiet:
            receive(quiet, 1)
            assert quiet._handler._keep_alive_interval == 0
            assert quiet._handler._keep_alive_thread is None
