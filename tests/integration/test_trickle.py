"""A trickle of requests through the real SDK and the embedded broker: rows are written and messages
settled within the flush age, not when a batch fills or the queue goes quiet (issue 12 §1)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from adapters.files import JsonLinesSink
from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.servicebus import ServiceBusAuth, create_client
from tests.integration.emulator import emulator_config, queue, topic
from tests.waiting import wait_for
from worker.bootstrap import bootstrap
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import Handled
from worker.service.observe import Disposition, PumpObserver, Settlement
from worker.service.ports import Delivery
from worker.service.pump import PumpConfig
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC = "assignment-requests", "assignment-events"
CONFIG = emulator_config([queue(QUEUE, LockDuration="PT30S")], [topic(TOPIC)])
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_trickle", "split": {"A": 0.5, "B": 0.5}}]})
INTERVAL = 0.3
FLUSH_AGE = 1.0
#: Far longer than the flush age: only the pump's cut of the receive wait to the rows' flush age can
#: settle the last requests of a trickle within ``LAST_SETTLED``. (Stopping the pump waits one out.)
MAX_WAIT = 20.0
#: A guard between the flush age (1 s) and the receive's wait (20 s), not a measured latency.
LAST_SETTLED = 12.0
#: Settled while requests still arrive, before the trickle stops by itself.
SETTLED_WHILE_ARRIVING = 5
#: A trickle this long means settling waited for something other than the flush age.
CAP = 150


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


class DurableFirst(PumpObserver):
    """Notes every message completed before its row was in the file."""

    def __init__(self, rows: Path) -> None:
        self.rows = rows
        self.completed = 0
        self.early: list[str] = []

    def on_settled(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        if settlement.disposition is Disposition.COMPLETE:
            self.completed += 1
            if _lines(self.rows) < self.completed:
                self.early.append(delivery.message_id)


def test_a_trickle_is_written_and_settled_by_the_flush_age(tmp_path: Path) -> None:
    """One request every 0.3 s: rows are written and messages settled as their rows come of age, while
    requests keep arriving (not when a batch fills or the queue goes quiet), and the last ones without a
    new request to end the receive.

    Driven by conditions, not measured lags: the trickle goes on until some are settled (a pump that
    settled only on a quiet queue never would be), then stops; the rest must settle well before the
    receive's own 20 s wait would end.
    """
    rows = tmp_path / "rows.jsonl"
    durable = DurableFirst(rows)
    with LocalBroker(BrokerConfig.from_dict(CONFIG)) as broker:
        client = create_client(ServiceBusAuth(connection_string=broker.connection_string))
        sink = JsonLinesSink(rows, max_age=FLUSH_AGE)
        pump = bootstrap(
            WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC),
            client=client,
            sink=sink,
            registry=lambda: REGISTRY,
            config=PumpConfig(queue_name=QUEUE, topic_name=TOPIC, max_wait=MAX_WAIT),
            observers=[durable],
        )
        runner = threading.Thread(target=pump.run, name="pump")
        runner.start()
        sent: list[str] = []
        settled_while_arriving = threading.Event()

        def trickle() -> None:
            with (
                ServiceBusClient.from_connection_string(broker.connection_string) as sender_client,
                sender_client.get_queue_sender(QUEUE) as sender,
            ):
                while len(sent) < CAP and not settled_while_arriving.is_set():
                    body = json.dumps({"user_id": f"U{len(sent)}", "experiment_id": "exp_trickle"})
                    sender.send_messages(ServiceBusMessage(body, message_id=f"trickle-{len(sent)}"))
                    sent.append(f"trickle-{len(sent)}")
                    # A pause, not a wait for anything: the trickle's pace, whatever the machine's speed.
                    settled_while_arriving.wait(INTERVAL)

        sender = threading.Thread(target=trickle, name="trickle")
        try:
            sender.start()
            wait_for(
                lambda: pump.stats.completed >= SETTLED_WHILE_ARRIVING or not sender.is_alive(),
                CAP * INTERVAL + 30,
                f"{SETTLED_WHILE_ARRIVING} requests settled while the trickle goes on",
            )
            settled_while_arriving.set()
            sender.join(30)
            assert len(sent) < CAP, f"nothing settled in {CAP} requests: settling waited for a quiet queue"
            # No request comes now to end the receive: only the flush age can settle the rest.
            wait_for(
                lambda: pump.stats.completed == len(sent),
                LAST_SETTLED,
                f"the trickle's last requests to be settled by age, not by the receive's {MAX_WAIT:g} s wait",
            )
        finally:
            pump.stop()
            runner.join(30)
            client.close()

    assert durable.early == [], "messages were settled before their rows were in the file"
    assert _lines(rows) == len(sent)
