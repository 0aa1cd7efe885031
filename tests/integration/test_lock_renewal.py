"""Holding thousands of 5 s locks through the real SDK against the embedded broker (issue 16 §2).

Service Bus allows a 5 s lock. With a 10 s renewal margin every held lock is due in every round;
renewed one per request, 4,000 locks took longer than their lock, and the SDK's management link ran
out of credit (pyAMQP grants 10,000 and never more) after about three rounds: from then on every
renewal and every liveness peek on that healthy connection timed out, the liveness check took it for
a dead one, and the locks lapsed. The broker runs with a max delivery count of 1: a lapsed lock is a
dead letter.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.servicebus import ServiceBusAuth, ServiceBusSource, create_client, send_requests
from adapters.servicebus.lock import LockKeeper
from tests.waiting import wait_for
from worker.service.ports import Delivery

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::ResourceWarning")]

QUEUE = "assignment-requests"


def config(lock: str) -> BrokerConfig:
    return BrokerConfig.from_dict(
        {
            "UserConfig": {
                "Namespaces": [
                    {
                        "Name": "locks",
                        "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 1, "LockDuration": lock}}],
                        "Topics": [],
                    }
                ]
            }
        }
    )


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    """The embedded broker (max delivery count 1) holding ``count`` requests."""
    lock, count = request.param
    with LocalBroker(config(lock)) as running:
        with ServiceBusClient.from_connection_string(running.connection_string) as client:
            for start in range(0, count, 2000):
                ids = [f"m{i}" for i in range(start, min(count, start + 2000))]
                send_requests(client, QUEUE, [json.dumps({"i": i}).encode() for i in ids], message_ids=ids)
        yield running


def receive_all(source: ServiceBusSource, count: int) -> list[Delivery]:
    held: list[Delivery] = []

    def more() -> bool:
        held.extend(source.receive(500, 1.0))
        return len(held) >= count

    wait_for(more, 60, f"{count} received")
    return held


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", [("PT5S", 4000)], indirect=True)
def test_four_thousand_five_second_locks_are_held_and_then_completed(broker: LocalBroker) -> None:
    """4,000 locks of 5 s held for 15 s (three lock durations): none lapses, few requests, all complete."""
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string))
    source = ServiceBusSource(client, QUEUE)
    try:
        held = receive_all(source, 4000)
        started = time.monotonic()
        # Three lock durations: only renewal keeps these locks; a lapse is a dead letter.
        wait_for(lambda: time.monotonic() - started >= 15, 30, "three lock durations")
        counts = broker.message_counts(QUEUE)
        assert (counts["locked"], counts["dead_letter"]) == (4000, 0)
        assert source.locks.failures == 0
        assert source.complete_batch(held) == []
        assert broker.message_counts(QUEUE)["active"] == 0
        per_round = source.locks.requests / max(1, source.locks.rounds)
        print(f"\n[5 s locks x 4000] rounds={source.locks.rounds} requests/round={per_round:.1f}")
        assert per_round <= 10
        assert source.watch.silences == 0
    finally:
        source.close()
        client.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", [("PT30S", 1)], indirect=True)
def test_management_requests_keep_answering_past_the_sdks_link_credit(
    broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More renewals on one connection than the SDK's management link has credit for: every one answered.

    The SDK's link credit (10,000) is lowered to 40 for the test (the SDK reads it when it opens the
    link); each renewal here is one management request.
    """
    from azure.servicebus._pyamqp import link

    monkeypatch.setattr(link, "DEFAULT_LINK_CREDIT", 40)
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=0, try_timeout=2)
    source = ServiceBusSource(client, QUEUE, lock_keeper=LockKeeper(margin=3600.0))
    try:
        held = receive_all(source, 1)
        for _ in range(100):
            source.locks.renew_due()
        assert (source.locks.renewals, source.locks.failures) == (100, 0)
        assert source.locks.request_failures == 0
        assert source.complete_batch(held) == []
    finally:
        source.close()
        client.close()


def keep_alive_threads() -> set[threading.Thread]:
    """The SDK's keep-alive threads running in this process (pyAMQP names them after their target)."""
    return {thread for thread in threading.enumerate() if "_keep_alive" in thread.name}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", [("PT30S", 2)], indirect=True)
def test_no_thread_of_the_sdks_reads_the_receivers_connection_beside_the_renewals(broker: LocalBroker) -> None:
    """At prefetch 0 the SDK reads the connection from a keep-alive thread every 5 s, outside the source's lock.

    Racing a renewal or a receive on another thread, that thread can hand a message on with another's
    delivery tag (the SDK logs ``Transfer callback function failed with error: KeyError(<tag>)``): the
    message is never settled and its lock lapses, a dead letter at max delivery count 1. The source's
    receiver starts no such thread; it still receives, renews and completes.
    """
    already = keep_alive_threads()
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string))
    source = ServiceBusSource(client, QUEUE, lock_keeper=LockKeeper(margin=3600.0))  # prefetch 0
    try:
        held = receive_all(source, 2)
        assert keep_alive_threads() - already == set()
        source.locks.renew_due()
        assert (source.locks.renewals, source.locks.failures) == (2, 0)
        assert source.complete_batch(held) == []
    finally:
        source.close()
        client.close()
    assert broker.message_counts(QUEUE)["active"] == 0
