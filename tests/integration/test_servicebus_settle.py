"""Range settlement through the real SDK on the embedded broker: it happens, it is counted, and an SDK
whose internals changed falls back to one-by-one completion with a WARNING instead of failing batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.servicebus import ServiceBusAuth, ServiceBusSource, create_client, send_requests
from adapters.servicebus.internals import GUARDS
from adapters.servicebus.settle import RangeSettlement
from tests.renamed_sdk import PublicOnly
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

QUEUE = "assignment-requests"
CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "sbemulatorns",
                "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 10, "LockDuration": "PT30S"}}],
                "Topics": [],
            }
        ]
    }
}


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """The embedded broker with one request queue."""
    with LocalBroker(BrokerConfig.from_dict(CONFIG)) as running:
        yield running


class PublicOnlyReceivers:
    """A client wrapper whose queue receivers expose only the SDK's public API."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get_queue_receiver(self, *args: Any, **kwargs: Any) -> Any:
        """The real receiver behind a :class:`PublicOnly` front."""
        return PublicOnly(self.client.get_queue_receiver(*args, **kwargs))


def receive_all(source: ServiceBusSource, count: int) -> list[Any]:
    """Receive until ``count`` deliveries are in hand (the first receive also opens the link)."""
    got: list[Any] = []

    def arrived() -> bool:
        got.extend(source.receive(count - len(got), 2.0))
        return len(got) >= count

    wait_for(arrived, 60, f"{count} deliveries", interval=0, detail=lambda: f"{len(got)} arrived")
    assert len(got) == count
    return got


def range_metric(reader: InMemoryMetricReader) -> int:
    """The ``ab.range_settlements`` counter's value."""
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        int(point.value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "ab.range_settlements"
        for point in metric.data.data_points
        if isinstance(point, NumberDataPoint)  # a counter's points
    )


@pytest.mark.timeout(60)
def test_batch_completion_really_settles_by_ranges(broker: LocalBroker) -> None:
    """30 deliveries completed as a batch: range dispositions happen, are counted and metered, queue empties."""
    reader = InMemoryMetricReader()
    ranges = RangeSettlement(meter_provider=MeterProvider(metric_readers=[reader]))
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    with client:
        send_requests(client, QUEUE, [b"{}"] * 30)
        source = ServiceBusSource(client, QUEUE, prefetch=30, range_settlement=ranges)
        try:
            deliveries = receive_all(source, 30)
            lost = source.complete_batch(deliveries)
        finally:
            source.close()
    assert not lost
    assert ranges.enabled
    assert ranges.settlements >= 1
    assert ranges.settled_messages >= 2
    assert range_metric(reader) == ranges.settlements
    counts = broker.message_counts(QUEUE)
    assert (counts["active"], counts["locked"]) == (0, 0), counts


@pytest.mark.timeout(60)
def test_sdk_without_the_private_api_falls_back_one_by_one_with_a_warning(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver without its private API: one WARNING per guard it trips, range settlement off, all still completed."""
    GUARDS.reset()
    ranges = RangeSettlement()
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    with client:
        send_requests(client, QUEUE, [b"{}"] * 12)
        source = ServiceBusSource(PublicOnlyReceivers(client), QUEUE, prefetch=12, range_settlement=ranges)  # type: ignore[arg-type]
        try:
            first = receive_all(source, 6)
            with caplog.at_level(logging.INFO, logger="adapters.servicebus"):
                lost_first = source.complete_batch(first)
                second = receive_all(source, 6)
                lost_second = source.complete_batch(second)
        finally:
            source.close()
    assert not lost_first
    assert not lost_second
    assert not ranges.enabled
    assert ranges.settlements == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "link identity is off" in w]) == 1, warnings
    # Each guard the public-only receiver trips says so once; nothing else warns.
    assert len(warnings) == len(GUARDS.tripped) == 3, warnings
    assert GUARDS.tripped == {"link identity", "keeping a broken receive's messages", "no receiver keep-alive thread"}
    assert broker.message_counts(QUEUE)["active"] == 0
    assert broker.message_counts(QUEUE)["locked"] == 0
