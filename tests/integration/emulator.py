"""What integration tests build an embedded broker from: its entities, the broker itself, a worker pump on it.

The entities are in the official emulator's Config.json shape (``docs/operations.md``), one namespace.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusSubQueue

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.memory import MemorySink
from adapters.servicebus import ServiceBusAuth, ServiceBusPublisher, ServiceBusSource, create_client
from tests.waiting import collect
from worker.domain.registry import ExperimentRegistry
from worker.service.pump import Pump, PumpConfig, PumpStats, settled

QUEUE, TOPIC = "assignment-requests", "assignment-events"


def queue(name: str, **properties: Any) -> dict[str, Any]:
    """A queue entity with these ``Properties`` (``MaxDeliveryCount=1``, ``LockDuration="PT30S"``, ...)."""
    return {"Name": name, "Properties": properties}


def topic(name: str, **properties: Any) -> dict[str, Any]:
    """A topic entity with these ``Properties`` and the one subscription ``all``."""
    return {"Name": name, "Properties": properties, "Subscriptions": [{"Name": "all"}]}


def emulator_config(queues: Sequence[dict[str, Any]], topics: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The broker configuration holding these entities, in namespace ``sbemulatorns``."""
    return {"UserConfig": {"Namespaces": [{"Name": "sbemulatorns", "Queues": [*queues], "Topics": [*topics]}]}}


@contextmanager
def running_broker(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch | None = None) -> Iterator[LocalBroker]:
    """The embedded broker on ``config``, stopped after; with ``monkeypatch``, the CLI pointed at it."""
    with LocalBroker(BrokerConfig.from_dict(config)) as running:
        if monkeypatch is not None:
            monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", running.connection_string)
        yield running


def run_pump(
    broker: LocalBroker,
    registry: ExperimentRegistry,
    count: int,
    *,
    sink: MemorySink | None = None,
    max_batch: int = 20,
) -> PumpStats:
    """The worker's pump on the real SDK, from ``QUEUE`` to ``TOPIC``, until ``count`` requests were settled."""
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    try:
        pump = Pump(
            ServiceBusSource(client, QUEUE),
            ServiceBusPublisher(client, TOPIC, requests_queue=QUEUE),
            MemorySink() if sink is None else sink,
            lambda: registry,
            config=PumpConfig(max_batch=max_batch, max_wait=1.0, min_backoff=0.05, max_backoff=0.2),
        )
        return pump.run(until=settled(count))
    finally:
        client.close()


def dead_letters(broker: LocalBroker, expected: int) -> dict[str, tuple[str, str]]:
    """The requests queue's ``expected`` dead letters by message id, (reason, description); each is completed."""
    found: dict[str, tuple[str, str]] = {}
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver,
    ):
        for message in collect(
            lambda: receiver.receive_messages(max_message_count=50, max_wait_time=0.5),
            expected,
            what="the dead letters",
        ):
            reason, description = message.dead_letter_reason, message.dead_letter_error_description
            found[str(message.message_id)] = (str(reason), str(description))
            receiver.complete_message(message)
    assert len(found) == expected, found
    return found
