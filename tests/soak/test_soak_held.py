"""Soak: connection resets and a long recovering disk, with the broker's max delivery count at 1 (issue 16).

Skipped unless ``AB_WORKER_SOAK=1``. Run it with::

    AB_WORKER_SOAK=1 .venv/bin/pytest tests/soak/test_soak_held.py -m soak -s

* resets: 10,000 requests (``AB_WORKER_SOAK_RESET_MESSAGES``) through a TCP fault proxy to the real
  worker (lock 20 s); every few seconds each live connection is reset mid-stream (the next
  ``n`` bytes, ``n`` random), until ``AB_WORKER_SOAK_RESETS`` (default 5) resets landed;
* disk: 4,000 requests held on a 5 s lock while the rows file refuses every write for 60 s
  (``AB_WORKER_SOAK_DISK_SECONDS``), then recovers.

With a max delivery count of 1, every burned delivery count is a dead letter. Each prints its figures
(dead letters, lost, duplicates, settlements by lock token, renewal requests) and proves lost = 0 with
:func:`tests.integration.test_faults.assert_no_loss`.
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from adapters.local.broker import LocalBroker
from adapters.local.faultproxy import FaultProxy
from adapters.servicebus import ServiceBusSource
from tests.integration.test_faults import (
    DROPPED_CONNECTION_WARNINGS,
    EXPERIMENTS,
    QUEUE,
    Requests,
    assert_no_loss,
    broker_config,
    drain_events,
    read_rows,
)
from tests.integration.test_held_through_faults import HeldWorker
from tests.waiting import wait_for
from worker import bootstrap
from worker.domain.registry import ExperimentRegistry
from worker.service.settings import WorkerSettings

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("AB_WORKER_SOAK") != "1", reason="soak run: set AB_WORKER_SOAK=1"),
    *DROPPED_CONNECTION_WARNINGS,
]

RESET_MESSAGES = int(os.environ.get("AB_WORKER_SOAK_RESET_MESSAGES", "10000"))
RESETS = int(os.environ.get("AB_WORKER_SOAK_RESETS", "5"))
DISK_SECONDS = float(os.environ.get("AB_WORKER_SOAK_DISK_SECONDS", "60"))


def figures(
    broker: LocalBroker, source: ServiceBusSource, requests: Requests, rows: Path, stats: Any
) -> dict[str, Any]:
    """What happened, then the proof (raises on any loss or dead letter)."""
    events = drain_events(broker.connection_string, broker, timeout=120)
    found, broken = read_rows(rows)
    counts = broker.message_counts(QUEUE)
    seen = {
        "requests": len(requests.by_id),
        "dead_letters": counts["dead_letter"],
        "left_on_queue": counts["active"],
        "events": sum(len(b) for b in events.values()),
        "duplicate_events": sum(len(b) - 1 for b in events.values()),
        "rows": sum(len(r) for r in found.values()),
        "settlement_lost": stats.settlement_lost,
        "settled_by_token": source.settled_by_token,
        "renewal_requests": source.locks.requests,
        "renewals": source.locks.renewals,
        "liveness_silences": source.watch.silences,
        "receiver_rebuilds": source.reconnects,
    }
    print(f"\n{seen}")
    assert not broken
    assert_no_loss(requests, events, found, broker)
    return seen


@pytest.mark.timeout(1800)
def test_soak_connection_resets_with_max_delivery_count_one(tmp_path: Path) -> None:
    """10,000 requests, resets on live connections, lock 20 s, max delivery count 1: no dead letter, lost = 0."""
    rnd = random.Random(int(os.environ.get("AB_WORKER_SOAK_SEED", "16")))
    requests = Requests.make(RESET_MESSAGES, prefix="reset")
    rows = tmp_path / "rows.jsonl"
    with LocalBroker(broker_config("PT20S", max_delivery=1)) as broker, FaultProxy(broker.port) as proxy:
        requests.publish(broker.connection_string)
        registry = ExperimentRegistry.from_dict(EXPERIMENTS)
        settings = WorkerSettings(
            servicebus_connection_string=SecretStr(proxy.connection_string(broker.connection_string)),
            servicebus_try_timeout=5.0,
            max_batch=100,
            health_port=0,
        )
        pump = bootstrap.bootstrap(settings, registry=lambda: registry, rows_path=str(rows))
        source = pump.source
        assert isinstance(source, ServiceBusSource)
        runner = threading.Thread(target=pump.run, name="pump", daemon=True)
        runner.start()
        landed = 0
        try:

            def drained() -> bool:
                counts = broker.message_counts(QUEUE)
                return counts["active"] == 0 or pump.stats.settled >= RESET_MESSAGES

            while landed < RESETS and not drained():
                wait_for(lambda: pump.stats.completed > 0, 60, "the worker to get going")
                time.sleep(rnd.uniform(1.0, 4.0))  # a soak: resets land at random moments of the run
                before = proxy.stats.resets
                proxy.reset_after(rnd.randint(0, 4000))

                def reset_landed(before: int = before) -> bool:
                    return proxy.stats.resets > before or drained()

                wait_for(reset_landed, 60, "a reset")
                proxy.pass_through()
                landed += proxy.stats.resets > before
            # A request whose lock lapsed is dead-lettered by the broker (max delivery count 1) and never
            # seen again: wait for the queue, not for the pump's count.
            wait_for(drained, 600, "the queue to drain")
        finally:
            proxy.pass_through()
            pump.stop()
            runner.join(timeout=120)
        print(f"\n[soak resets: {landed} landed, proxy {proxy.stats}]")
        figures(broker, source, requests, rows, pump.stats)
    gc.collect()


@pytest.mark.timeout(1800)
def test_soak_recovering_disk_on_a_five_second_lock(tmp_path: Path) -> None:
    """4,000 held on a 5 s lock while the disk refuses writes for a minute, max delivery count 1: lost = 0."""
    requests = Requests.make(4000, prefix="disk")
    rows = tmp_path / "rows.jsonl"
    with LocalBroker(broker_config("PT5S", max_delivery=1)) as broker:
        requests.publish(broker.connection_string)
        worker = HeldWorker(broker.connection_string, rows, 4000)
        try:
            holding = worker.wait_holding(4000)
            wait_for(lambda: time.monotonic() - holding >= DISK_SECONDS, DISK_SECONDS + 60, "the outage")
            worker.disk.full.clear()
            wait_for(lambda: worker.pump.stats.settled >= 4000, 300, "every request settled")
        finally:
            worker.stop()
        rounds = max(1, worker.source.locks.rounds)
        print(
            f"\n[soak disk: {DISK_SECONDS:g} s outage, 4000 held, 5 s lock] renewal requests/round="
            f"{worker.source.locks.requests / rounds:.1f} rounds={worker.source.locks.rounds}"
        )
        figures(broker, worker.source, requests, rows, worker.pump.stats)
    gc.collect()
