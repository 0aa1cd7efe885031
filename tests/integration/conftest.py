"""Shared fixtures for integration tests: the embedded local Service Bus broker."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient

from adapters.local.broker import BrokerConfig, LocalBroker
from tests.integration.conftest_azure import *  # noqa: F403

# Entities for broker tests, in the official emulator's Config.json shape, on top of the defaults.
TEST_BROKER_CONFIG: dict[str, Any] = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "sbemulatorns",
                "Queues": [
                    {
                        "Name": "assignment-requests",
                        "Properties": {"MaxDeliveryCount": 10, "LockDuration": "PT30S"},
                    },
                    {
                        "Name": "short-lock",
                        "Properties": {"MaxDeliveryCount": 3, "LockDuration": "PT1S"},
                    },
                    # Renewal tests: Service Bus's shortest lock, long enough for a busy machine to renew in time.
                    {"Name": "five-second-lock", "Properties": {"LockDuration": "PT5S"}},
                    # Redelivery counting without a lock that can lapse between a receive and its abandon.
                    {"Name": "three-deliveries", "Properties": {"MaxDeliveryCount": 3, "LockDuration": "PT30S"}},
                    {
                        "Name": "expiring",
                        "Properties": {
                            "DefaultMessageTimeToLive": "PT1S",
                            "DeadLetteringOnMessageExpiration": True,
                        },
                    },
                    {
                        "Name": "dedup",
                        "Properties": {
                            "RequiresDuplicateDetection": True,
                            "DuplicateDetectionHistoryTimeWindow": "PT1M",
                        },
                    },
                ],
                "Topics": [
                    {
                        "Name": "assignment-events",
                        "Properties": {"RequiresDuplicateDetection": True},
                        "Subscriptions": [{"Name": "all"}, {"Name": "audit"}],
                    },
                    {
                        "Name": "events",
                        "Properties": {},
                        "Subscriptions": [
                            {"Name": "all"},
                            {
                                "Name": "eu",
                                "Rules": [
                                    {
                                        "Name": "eu-only",
                                        "Properties": {
                                            "FilterType": "Sql",
                                            "SqlFilter": {"SqlExpression": "region = 'eu' AND kind = 'x'"},
                                        },
                                    }
                                ],
                            },
                            {
                                "Name": "corr",
                                "Rules": [
                                    {
                                        "Name": "by-subject",
                                        "Properties": {
                                            "FilterType": "Correlation",
                                            "CorrelationFilter": {
                                                "Label": "special",
                                                "Properties": {"kind": "x"},
                                            },
                                        },
                                    }
                                ],
                            },
                        ],
                    },
                ],
            }
        ]
    }
}


@pytest.fixture(autouse=True)
def _collect_dropped_sdk_sockets() -> Iterator[None]:
    """Collect after each test the sockets pyamqp abandons (connections it lost, links closed late).

    Those sockets are reported as ResourceWarnings whenever the next collection happens (hypothesis
    calls gc.collect() as it starts) and, under xdist, that is an unrelated later test in the same
    process. The tests that drop connections already expect them; collect them here, quietly, so
    the run does not depend on which test happens to come next.
    """
    yield
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "unclosed <socket.socket", ResourceWarning)
        gc.collect()


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    """SDK clients made by a test, closed after it."""
    made: list[Any] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def broker_config() -> BrokerConfig:
    """The broker test entities (defaults plus short and five-second locks, dedup and a filtered topic)."""
    return BrokerConfig.from_dict(TEST_BROKER_CONFIG, source="TEST_BROKER_CONFIG")


@pytest.fixture
def local_broker(broker_config: BrokerConfig) -> Iterator[LocalBroker]:
    """A running local broker on a free port, stopped after the test."""
    broker = LocalBroker(broker_config).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def sb_client(local_broker: LocalBroker) -> Iterator[ServiceBusClient]:
    """A sync SDK client for ``local_broker`` with short retries so failures surface fast."""
    client = ServiceBusClient.from_connection_string(
        local_broker.connection_string,
        retry_total=3,
        retry_backoff_factor=0.2,
        retry_backoff_max=1,
    )
    try:
        yield client
    finally:
        client.close()
