"""A trickle of requests through the real SDK and the embedded broker: rows are written and messages
settled within the flush age, not when a batch fills or the queue goes quiet (issue 12 §1)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from adapters.files import JsonLinesSink
from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.servicebus import ServiceBusAuth, create_client
from worker.bootstrap import bootstrap
from worker.domain.registry import ExperimentRegistry
from worker.service.pump import PumpConfig
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC = "assignment-requests", "assignment-events"
CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "sbemulatorns",
                "Queues": [{"Name": QUEUE, "Properties": {"LockDuration": "PT30S"}}],
                "Topics": [{"Name": TOPIC, "Properties": {}, "Subscriptions": [{"Name": "all"}]}],
            }
        ]
    }
}
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_trickle", "split": {"A": 0.5, "B": 0.5}}]})
MESSAGES = 20
INTERVAL = 0.3
FLUSH_AGE = 1.0
#: Far longer than the flush age: a receive must not keep settlement waiting (the pump cuts its wait
#: to when the held rows fall due), so the lag stays within the age + 1 s whatever the wait.
MAX_WAIT = 5.0


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_a_trickle_is_written_and_settled_within_the_flush_age(tmp_path: Path) -> None:
    """One request every 0.3 s: each row is written and its message completed within the age + 1 s."""
    rows = tmp_path / "rows.jsonl"
    with LocalBroker(BrokerConfig.from_dict(CONFIG)) as broker:
        client = create_client(ServiceBusAuth(connection_string=broker.connection_string))
        sink = JsonLinesSink(rows, max_age=FLUSH_AGE)
        pump = bootstrap(
            WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC),
            client=client,
            sink=sink,
            registry=lambda: REGISTRY,
            config=PumpConfig(queue_name=QUEUE, topic_name=TOPIC, max_wait=MAX_WAIT),
        )
        runner = threading.Thread(target=pump.run, name="pump")
        runner.start()
        sent: list[float] = []

        def trickle() -> None:
            with (
                ServiceBusClient.from_connection_string(broker.connection_string) as sender_client,
                sender_client.get_queue_sender(QUEUE) as sender,
            ):
                for i in range(MESSAGES):
                    body = json.dumps({"user_id": f"U{i}", "experiment_id": "exp_trickle"})
                    sender.send_messages(ServiceBusMessage(body, message_id=f"trickle-{i}"))
                    sent.append(time.monotonic())
                    time.sleep(INTERVAL)

        sender = threading.Thread(target=trickle, name="trickle")
        try:
            sender.start()
            settled_at: list[float] = []
            settled_before_trickle_ended = 0
            deadline = time.monotonic() + 60
            while len(settled_at) < MESSAGES and time.monotonic() < deadline:
                completed, written = pump.stats.completed, _lines(rows)
                assert completed <= written, "a message was settled before its row was durable"
                now = time.monotonic()
                settled_at += [now] * (completed - len(settled_at))
                if sender.is_alive():
                    settled_before_trickle_ended = completed
                time.sleep(0.02)
            sender.join(30)
        finally:
            pump.stop()
            runner.join(30)
            client.close()

    assert len(settled_at) == MESSAGES, f"only {len(settled_at)} of {MESSAGES} settled"
    lags = [done - start for start, done in zip(sent, settled_at, strict=True)]
    assert max(lags) <= FLUSH_AGE + 1.0, [round(lag, 2) for lag in lags]
    # Not waiting for the queue to go quiet: most were settled while requests were still arriving.
    assert settled_before_trickle_ended >= MESSAGES - 5
    assert _lines(rows) == MESSAGES
