"""Soak: 100,000 requests through the embedded broker and real worker processes under random faults.

Skipped unless ``AB_WORKER_SOAK=1``. Run it with::

    AB_WORKER_SOAK=1 .venv/bin/pytest tests/soak -m soak -s

Two ``ab-worker run`` processes drain the queue while, every few seconds, one random fault strikes:
every connection is cut (``drop_connections``), the broker restarts over its state on the same port,
a worker is SIGKILLed and replaced, or — the workers connect through a TCP fault proxy — the network
misbehaves for a few seconds (connections reset mid-frame, blackholed, slowed to a drip, or delayed).
At the end the same proof as the fault-injection tests
(:func:`tests.integration.test_faults.assert_no_loss`) runs over every request: each has its event on
the ``all`` subscription and its row, with the documented variant; duplicates are byte-identical.
Tunable with ``AB_WORKER_SOAK_MESSAGES`` (default 100000) and ``AB_WORKER_SOAK_MINUTES`` (default 15).
"""

from __future__ import annotations

import gc
import os
import random
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from adapters.local.broker import LocalBroker
from adapters.local.faultproxy import FaultProxy
from tests.integration.test_faults import (
    ALL,
    QUEUE,
    Requests,
    WorkerProcess,
    assert_no_loss,
    broker_config,
    drain_events,
    read_rows,
    worker_env,
)

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("AB_WORKER_SOAK") != "1", reason="soak run: set AB_WORKER_SOAK=1"),
]

MESSAGES = int(os.environ.get("AB_WORKER_SOAK_MESSAGES", "100000"))
MINUTES = float(os.environ.get("AB_WORKER_SOAK_MINUTES", "15"))
WORKERS = 2


@pytest.mark.timeout(int(MINUTES * 60) + 600)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_soak_random_faults_lose_nothing(tmp_path: Path) -> None:
    """100k requests, random connection drops, broker restarts, worker SIGKILLs and network faults: lost = 0."""
    rnd = random.Random(int(os.environ.get("AB_WORKER_SOAK_SEED", "7")))
    requests = Requests.make(MESSAGES, prefix="soak")
    broker = LocalBroker(broker_config("PT5S", max_delivery=100)).start()
    proxy = FaultProxy(broker.port).start()
    network_faults = {
        "reset": lambda: proxy.reset_after(rnd.randrange(500, 20_000)),
        "blackhole": proxy.blackhole,
        "drip": lambda: proxy.slow_drip(0.005),
        "latency": lambda: proxy.latency(0.01),
    }
    clear_network_at: float | None = None
    workers: dict[int, WorkerProcess] = {}
    faults: Counter[str] = Counter()
    incarnation = 0

    def spawn(slot: int) -> None:
        nonlocal incarnation
        incarnation += 1
        env = worker_env(
            proxy.connection_string(broker.connection_string),
            PREFETCH="100",
            MAX_BATCH="100",
            SERVICEBUS_TRY_TIMEOUT="2",
            SERVICEBUS_PROBE_AFTER="3",
        )
        # A rows file per process: a SIGKILLed one may leave a torn last line, which must not tear another's.
        workers[slot] = WorkerProcess(tmp_path, f"w{incarnation}", env, rows=f"rows-{incarnation}.jsonl")

    try:
        published = time.monotonic()
        requests.publish(broker.connection_string)
        publish_seconds = time.monotonic() - published
        started = time.monotonic()
        deadline = started + MINUTES * 60
        for slot in range(WORKERS):
            spawn(slot)
        next_fault = time.monotonic() + rnd.uniform(3, 8)
        deck: list[str] = []
        while True:
            counts = broker.message_counts(QUEUE)
            if counts["active"] == 0:
                break
            assert time.monotonic() < deadline, f"soak did not finish in {MINUTES} min: {counts}"
            for slot, worker in list(workers.items()):
                if worker.proc.poll() is not None:
                    faults["worker exited by itself"] += 1
                    spawn(slot)
            if time.monotonic() >= next_fault:
                if not deck:  # every kind strikes in each round of four faults, in random order
                    deck = ["drop", "drop", "restart", "sigkill", rnd.choice(list(network_faults))]
                    rnd.shuffle(deck)
                fault = deck.pop()
                faults[fault] += 1
                if fault in network_faults:
                    network_faults[fault]()
                    clear_network_at = time.monotonic() + rnd.uniform(2, 8)
                elif fault == "drop":
                    broker.drop_connections()
                elif fault == "restart":
                    port, state = broker.port, broker.state
                    broker.stop()
                    time.sleep(rnd.uniform(0.5, 3))
                    broker = LocalBroker(port=port, state=state).start()
                else:
                    slot = rnd.randrange(WORKERS)
                    os.kill(workers[slot].proc.pid, signal.SIGKILL)
                    workers[slot].proc.wait(timeout=10)
                    spawn(slot)
                next_fault = time.monotonic() + rnd.uniform(3, 8)
            if clear_network_at is not None and time.monotonic() >= clear_network_at:
                proxy.recover()
                clear_network_at = None
            time.sleep(0.5)
        processing_seconds = time.monotonic() - started
        proxy.recover()
        for worker in workers.values():
            worker.proc.send_signal(signal.SIGTERM)
        for worker in workers.values():
            worker.wait(60)
        events = drain_events(broker.connection_string, broker, timeout=600)
        rows: dict[str, list[str]] = defaultdict(list)
        torn = 0
        for path in sorted(tmp_path.glob("rows*.jsonl")):
            found, broken = read_rows(path)
            torn += len(broken)
            for event_id, lines in found.items():
                rows[event_id].extend(lines)
        proof = assert_no_loss(requests, events, rows, broker)
        dead = broker.message_counts(QUEUE)["dead_letter"]
        subscription_left = broker.message_counts(ALL)["active"]
    finally:
        for worker in workers.values():
            worker.kill()
        proxy.stop()
        broker.stop()
    gc.collect()
    print(
        f"\n[soak] {proof.requests} requests in {processing_seconds:.0f} s "
        f"({proof.requests / processing_seconds:.0f} messages/s; publish {publish_seconds:.0f} s); "
        f"faults {dict(faults)}; worker incarnations {incarnation}; "
        f"redeliveries (duplicate rows) {proof.duplicate_rows}, duplicate events {proof.duplicate_events}; "
        f"torn row lines {torn}; dead-lettered {dead}; lost = 0"
    )
    assert subscription_left == 0
