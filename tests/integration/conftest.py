"""Shared fixtures for integration tests: the embedded local Service Bus broker."""

from __future__ import annotations

import gc
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
def _collect_garbage_in_the_test_that_made_it() -> Iterator[None]:
    """Collect after each test, so an unclosed socket is reported against the test that leaked it.

    Without this the garbage is collected whenever the next collection happens (hypothesis calls
    gc.collect() as it starts), and under xdist that is some unrelated later test in the same process.
    """
    yield
    gc.collect()


@pytest.fixture
def broker_config() -> BrokerConfig:
    """The broker test entities (defaults plus short-lock, dedup and a filtered topic)."""
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
