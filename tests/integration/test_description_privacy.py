"""Dead-letter descriptions of over-limit contexts name the key path and the problem, never the value.

Request context may hold personal data and leaves the worker only for allow-listed keys
(``docs/operations.md``, Security). A description travels far (the dead-letter queue, ``dlq peek``,
``ab_replay_original_description`` on every replayed copy), so it must not quote a context value:
it says where (``context.email``) and what (length, depth, character, kind). The real pump on the
real SDK against the embedded broker; the worker's log lines and spans are checked as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.memory import MemorySink
from adapters.servicebus import ServiceBusAuth, create_client, send_requests
from tests.integration.emulator import dead_letters
from worker import ExperimentRegistry
from worker.bootstrap import bootstrap
from worker.service.pump import PumpConfig, settled
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC = "assignment-requests", "assignment-events"
SECRET = "alice.liddell@example.com"
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp", "split": {"control": 0.5, "blue": 0.5}}]})

#: message id → (body, what the description must say). Every body carries SECRET where it breaks a limit.
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "too-long": ({"email": SECRET + "x" * 1024}, "context.email: holds a 1049-character string; the limit is 1024"),
    "surrogate": ({"email": SECRET + "\ud800"}, "context.email: holds a lone surrogate (U+D800 at index 25)"),
    "too-deep": ({"email": {"a": {"b": {"c": {"d": {"e": SECRET}}}}}}, "context.email.(key 1).(key 1).(key 1)"),
    "nested-list": ({"emails": ["ok", SECRET * 50]}, "context.emails[1]: holds a 1250-character string"),
    "long-key": ({"plan": "gold", SECRET * 50: True}, "context: key 2 holds a 1250-character string"),
    "too-many-keys": ({f"k{i}": SECRET for i in range(65)}, "context: has 65 keys; the limit is 64"),
    "not-object": (SECRET, "context: must be a JSON object, got a string"),  # type: ignore[dict-item]
}


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """A requests queue and an events topic."""
    config = {
        "UserConfig": {
            "Namespaces": [
                {
                    "Name": "sbemulatorns",
                    "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 10, "LockDuration": "PT30S"}}],
                    "Topics": [{"Name": TOPIC, "Subscriptions": [{"Name": "all"}]}],
                }
            ]
        }
    }
    with LocalBroker(BrokerConfig.from_dict(config)) as running:
        yield running


def test_dead_letter_descriptions_name_the_key_path_and_never_quote_a_context_value(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Each over-limit context is dead-lettered SchemaValidationFailed naming path and problem; SECRET is in
    no description, log line or span, although ``plan`` is allow-listed (the allow-list does not widen it)."""
    bodies = [
        json.dumps({"user_id": "U1", "experiment_id": "exp", "context": context}).encode()
        for context, _ in CASES.values()
    ]
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, bodies, message_ids=list(CASES))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sb = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    caplog.set_level(logging.DEBUG)
    try:
        pump = bootstrap(
            WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC, prefetch=50),
            client=sb,
            sink=MemorySink(max_rows=50),
            registry=lambda: REGISTRY,
            tracer_provider=provider,
            config=PumpConfig(max_wait=0.5, min_backoff=0.05, max_backoff=0.2, context_allow_list=frozenset({"plan"})),
        )
        stats = pump.run(until=settled(len(CASES)))
    finally:
        sb.close()
    assert stats.dead_letters == {"SchemaValidationFailed": len(CASES)}
    letters = dead_letters(broker, len(CASES))
    for name, (_, expected) in CASES.items():
        reason, description = letters[name]
        assert reason == "SchemaValidationFailed"
        assert expected in description, (name, description)
        assert "alice" not in description, (name, description)
        assert "example" not in description, (name, description)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "alice" not in logged
    spans = exporter.get_finished_spans()
    assert spans
    for span in spans:
        assert "alice" not in json.dumps(dict(span.attributes or {}), default=str)
        assert "alice" not in (span.status.description or "")
