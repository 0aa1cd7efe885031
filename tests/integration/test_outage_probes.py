"""Outages longer than the liveness timeout, seen through the real /healthz and /readyz endpoints, and
SIGTERM mid-outage against the drain deadline: the real SDKs against the embedded broker and the
Kusto stand-in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient

from adapters.health import HealthServer
from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.local.standins.kusto import KustoStandIn
from adapters.servicebus import ServiceBusAuth, create_client, send_requests
from tests.waiting import wait_for
from worker.bootstrap import bootstrap, pump_config
from worker.domain.registry import ExperimentRegistry
from worker.service.observe import PumpObserver
from worker.service.ports import Delivery
from worker.service.pump import settled
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC = "assignment-requests", "assignment-events"
DATABASE = "experiments"
EXPERIMENTS = {"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]}
REGISTRY = ExperimentRegistry.from_dict(EXPERIMENTS)
COUNT = 30
#: Service Bus's shortest lock, shorter than the outages: only renewal keeps the counts flat. (A 2 s
#: lock left the keeper about a second of slack, too little on a busy machine.)
LOCK = 5.0
#: Ends a wait that only a hang outlasts (a flush attempt here waits 60 s), never a slow machine.
HANG_GUARD = 30.0


def broker_config() -> BrokerConfig:
    """A queue whose lock (``LOCK``) is shorter than the outages, so only renewal keeps the counts flat."""
    return BrokerConfig.from_dict(
        {
            "UserConfig": {
                "Namespaces": [
                    {
                        "Name": "sbemulatorns",
                        "Queues": [
                            {"Name": QUEUE, "Properties": {"MaxDeliveryCount": 10, "LockDuration": f"PT{LOCK:g}S"}}
                        ],
                        "Topics": [{"Name": TOPIC, "Properties": {}, "Subscriptions": [{"Name": "all"}]}],
                    }
                ]
            }
        }
    )


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """The embedded broker holding ``COUNT`` requests."""
    with LocalBroker(broker_config()) as running:
        with ServiceBusClient.from_connection_string(running.connection_string) as client:
            bodies = [json.dumps({"user_id": f"U{i}", "experiment_id": "exp_001"}).encode() for i in range(COUNT)]
            send_requests(client, QUEUE, bodies, message_ids=[f"r-{i}" for i in range(COUNT)])
        yield running


def probe(port: int, path: str) -> tuple[int, str]:
    """Status and detail of one GET."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())["detail"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["detail"]


class DeliveryCounts(PumpObserver):
    """Every delivery count the broker reported, per message."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}

    def on_received(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self.seen.setdefault(delivery.message_id, []).append(delivery.delivery_count)


@pytest.mark.timeout(120)
def test_sink_outage_longer_than_liveness_keeps_healthz_up_and_burns_no_delivery_counts(
    broker: LocalBroker, kusto: KustoStandIn
) -> None:
    """Kusto down for over 2x the 3 s liveness timeout and past the lock: /healthz 200 throughout, /readyz 503
    naming the sink; after recovery every request completed on its first delivery."""
    settings = WorkerSettings.model_construct(
        queue_name=QUEUE,
        topic_name=TOPIC,
        liveness_timeout=3.0,
        kusto_ingest_uri=kusto.cluster_uri,
        kusto_database=DATABASE,
        kusto_mode="streaming",
        kusto_flush_attempts=1,
        kusto_attempt_timeout=1.0,
    )
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    counts = DeliveryCounts()
    pump = bootstrap(
        settings,
        client=client,
        registry=lambda: REGISTRY,
        config=replace(pump_config(settings), max_wait=0.5, min_backoff=0.1, max_backoff=0.4),
        observers=[counts],
    )
    server = HealthServer(pump.health, host="127.0.0.1", port=0).start()
    probes: list[tuple[float, int, int, str]] = []
    done = threading.Event()

    def prober() -> None:
        while not done.is_set():
            live, (ready, detail) = probe(server.port, "/healthz")[0], probe(server.port, "/readyz")
            probes.append((time.monotonic(), live, ready, detail))
            time.sleep(0.1)

    kusto.fail_with(503)
    runner = threading.Thread(target=pump.run, kwargs={"until": settled(COUNT)}, daemon=True)
    watcher = threading.Thread(target=prober, daemon=True)
    try:
        runner.start()
        watcher.start()
        wait_for(lambda: any(p[2] == 503 and "record sink down" in p[3] for p in probes), 60, "the sink outage")
        outage_seen = next(p[0] for p in probes if p[2] == 503)
        # The outage ends when the probes have seen it outlast both the liveness timeout (twice) and the lock.
        long_enough = max(2 * settings.liveness_timeout, LOCK + 1)
        wait_for(lambda: probes[-1][0] - outage_seen > long_enough, 60, "a long outage")
        kusto.recover()
        runner.join(60)
        assert not runner.is_alive(), "the pump never finished after the sink recovered"
    finally:
        done.set()
        kusto.recover()
        watcher.join(10)
        server.stop()
        client.close()
    during = [p for p in probes if p[0] >= outage_seen and "record sink down" in p[3]]
    assert during[-1][0] - during[0][0] > 2 * settings.liveness_timeout - 0.5, "the outage was too short to prove it"
    assert [p for p in during if p[1] != 200] == [], "liveness failed while the pump was backing off on purpose"
    assert {p[2] for p in during} == {503}
    assert pump.stats.completed == COUNT
    assert pump.stats.abandoned == pump.stats.settlement_lost == 0
    assert sorted(counts.seen) == sorted(f"r-{i}" for i in range(COUNT))
    first = counts.seen["r-0"]
    assert len(first) == 1, "received twice"
    assert {m: c for m, c in counts.seen.items() if c != first} == {}, "a delivery count grew"
    assert broker.message_counts(QUEUE) == {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0, "scheduled": 0}
    assert len(kusto.rows("AssignmentEvents")) == COUNT
    outage = during[-1][0] - during[0][0]
    print(f"\n[liveness] sink outage {outage:.1f}s, {len(during)} probes: /healthz 200, /readyz 503; counts flat")


def worker_env(broker: LocalBroker, **settings: str) -> dict[str, str]:
    """A clean environment for ``ab-worker run``: our settings only."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("AB_WORKER_", "APPLICATIONINSIGHTS_", "OTEL_"))
    }
    env.update(
        AB_WORKER_SERVICEBUS_CONNECTION_STRING=broker.connection_string,
        AB_WORKER_HEALTH_PORT="0",
        AB_WORKER_MAX_WAIT="1.0",
    )
    env.update({f"AB_WORKER_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.mark.timeout(120)
def test_sigterm_mid_outage_exits_within_the_drain_deadline(
    broker: LocalBroker, kusto: KustoStandIn, tmp_path: Path
) -> None:
    """Kusto hangs (each try may take 60 s): SIGTERM still ends the worker by AB_WORKER_DRAIN_DEADLINE, and the
    held requests go back to the queue for another replica, none dead-lettered."""
    config = tmp_path / "experiments.json"
    config.write_text(json.dumps(EXPERIMENTS), encoding="utf-8")
    env = worker_env(
        broker,
        DRAIN_DEADLINE="3",
        KUSTO_INGEST_URI=kusto.cluster_uri,
        KUSTO_DATABASE=DATABASE,
        KUSTO_MODE="streaming",
        KUSTO_FLUSH_ATTEMPTS="1",
        KUSTO_ATTEMPT_TIMEOUT="60",
    )
    kusto.hang()  # every flush attempt waits out its 60 s timeout
    stderr = tmp_path / "worker.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: len(kusto.requests) > 0, 60, "the worker to try a flush")
        assert broker.message_counts(QUEUE)["locked"] == COUNT
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            # Only a worker that waited for Kusto (60 s) fails this; a busy machine's slow exit does not.
            code = proc.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker outlived its 3 s drain deadline by far: " + stderr.read_text()[-2000:])
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        kusto.recover()
    log = stderr.read_text(encoding="utf-8", errors="replace")
    assert code == 1, log[-2000:]
    assert "Drain deadline of 3.0s passed" in log
    wait_for(lambda: broker.message_counts(QUEUE)["locked"] == 0, what="the held requests to be released")
    counts: dict[str, Any] = broker.message_counts(QUEUE)
    assert (counts["active"], counts["dead_letter"]) == (COUNT, 0)
    print(f"\n[drain-deadline] SIGTERM to exit {took:.1f}s (deadline 3 s); {COUNT} held requests back on the queue")
