"""A held batch rides out routine cloud faults without burning a delivery count (issue 16 §1, §2).

The real worker (composition root, real SDK) holds a whole backlog while its rows file cannot be
written, then one of:

* the disk recovers, on Service Bus's shortest lock (5 s), with 4,000 messages held: every lock is
  due in every renewal round (§2);
* every connection is reset while the batch is held (an idle timeout or a gateway upgrade
  recycling connections) and the link the batch came on is replaced (§1).

The broker's max delivery count is 1, so each burned count is a dead letter and the proof
(:func:`tests.integration.test_faults.assert_no_loss`) fails on it. The disk is failed from the test's
side at the one place the sink writes (``EFBIG``, as a file-size limit gives), never by timing.
"""

from __future__ import annotations

import errno
import gc
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from adapters.files import JsonLinesSink
from adapters.local.broker import LocalBroker
from adapters.local.faultproxy import FaultProxy
from adapters.servicebus import ServiceBusSource
from tests.integration.test_faults import (
    DROPPED_CONNECTION_WARNINGS,
    EXPERIMENTS,
    Requests,
    assert_no_loss,
    broker_config,
    drain_events,
    read_rows,
)
from tests.waiting import wait_for
from worker import bootstrap
from worker.domain.registry import ExperimentRegistry
from worker.service.pump import Pump
from worker.service.settings import WorkerSettings

pytestmark = [
    pytest.mark.integration,
    *DROPPED_CONNECTION_WARNINGS,
]


class RecoveringDisk(JsonLinesSink):
    """The rows file, on a disk that refuses every write (EFBIG) while ``full`` is set."""

    def __init__(self, path: Path, rows: int) -> None:
        # Due only once the whole backlog is buffered: the outage then holds all of it.
        super().__init__(path, max_rows=rows, max_age=600.0)
        self.full = threading.Event()
        self.full.set()

    def _append(self, payload: bytes) -> None:
        if self.full.is_set():
            raise OSError(errno.EFBIG, "File too large")
        super()._append(payload)


class HeldWorker:
    """The worker built by the composition root, on a recovering disk, running on a thread."""

    def __init__(self, connection_string: str, rows: Path, count: int, **settings: Any) -> None:
        self.disk = RecoveringDisk(rows, count)
        registry = ExperimentRegistry.from_dict(EXPERIMENTS)
        self.pump: Pump = bootstrap.bootstrap(
            WorkerSettings(
                servicebus_connection_string=SecretStr(connection_string),
                max_batch=500,
                max_wait=1.0,
                prefetch=0,
                health_port=0,
                **settings,
            ),
            registry=lambda: registry,
            sink=self.disk,
        )
        assert isinstance(self.pump.source, ServiceBusSource)
        self.source: ServiceBusSource = self.pump.source
        self._thread = threading.Thread(target=self.pump.run, name="pump", daemon=True)
        self._thread.start()

    def wait_holding(self, count: int) -> float:
        """Wait until the pump holds ``count`` messages through a failing flush; when it started holding."""
        wait_for(
            lambda: self.pump.stats.downstream_retries >= 1 and self.pump.stats.received == count,
            120,
            f"the worker to hold {count} messages",
            # Which message is missing shows in these: a lapsed lock is a dead letter, a reset a reconnect.
            detail=lambda: (
                f"pump {self.pump.stats}; source reconnects {self.source.reconnects}, "
                f"kept from broken receives {self.source.kept_from_broken_receives}"
            ),
        )
        return time.monotonic()

    def stop(self) -> None:
        self.pump.stop()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the pump did not stop"


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[Callable[..., tuple[LocalBroker, HeldWorker, Requests]]]:
    """Start a broker (max delivery count 1) with requests, optionally a fault proxy, and the worker."""
    started: list[Any] = []

    def start(
        count: int, lock: str, proxy: bool = False, **settings: Any
    ) -> tuple[LocalBroker, HeldWorker, Requests, FaultProxy | None]:
        requests = Requests.make(count)
        broker = LocalBroker(broker_config(lock, max_delivery=1)).start()
        started.append(broker.stop)
        requests.publish(broker.connection_string)
        fault_proxy = None
        connection_string = broker.connection_string
        if proxy:
            fault_proxy = FaultProxy(broker.port).start()
            started.append(fault_proxy.stop)
            connection_string = fault_proxy.connection_string(broker.connection_string)
        worker = HeldWorker(connection_string, tmp_path / "rows.jsonl", count, **settings)
        started.append(worker.stop)
        return broker, worker, requests, fault_proxy

    yield start  # type: ignore[misc]
    for stop in reversed(started):
        stop()
    started.clear()
    # The SDK's keep-alive threads hold their connection for up to a second after a close: let them
    # end, then collect the abandoned sockets now, while this test's warning filters apply.
    wait_for(
        lambda: not any("_keep_alive" in t.name for t in threading.enumerate()), 30, "the SDK's keep-alive threads"
    )
    gc.collect()


def finish(broker: LocalBroker, worker: HeldWorker, requests: Requests, rows: Path) -> dict[str, Any]:
    """Let the worker settle everything, stop it, and prove lost = 0 with no dead letter."""
    total = len(requests.by_id)
    wait_for(lambda: worker.pump.stats.settled >= total, 120, "every request settled")
    worker.stop()
    events = drain_events(broker.connection_string, broker)
    found, broken = read_rows(rows)
    assert not broken
    proof = assert_no_loss(requests, events, found, broker)
    return {
        "dead_letters": broker.message_counts("assignment-requests")["dead_letter"],
        "duplicates": proof.duplicate_events,
        "settlement_lost": worker.pump.stats.settlement_lost,
        "settled_by_token": getattr(worker.source, "settled_by_token", 0),
        "silences": worker.source.watch.silences,
        "renewal_rounds": getattr(worker.source.locks, "rounds", None),
        "renewal_requests": getattr(worker.source.locks, "requests", None),
        "renewals": worker.source.locks.renewals,
    }


@pytest.mark.timeout(300)
def test_a_recovering_disk_on_a_five_second_lock_dead_letters_nothing(
    scenario: Callable[..., Any], tmp_path: Path
) -> None:
    """4,000 held on a 5 s lock through three lock durations of a full disk, then recovery: all complete, once."""
    broker, worker, requests, _ = scenario(4000, "PT5S", servicebus_probe_after=3.0)
    holding = worker.wait_holding(4000)
    wait_for(lambda: time.monotonic() - holding >= 15, 30, "three lock durations of the outage")
    worker.disk.full.clear()
    figures = finish(broker, worker, requests, tmp_path / "rows.jsonl")
    print(f"\n[recovering disk, 5 s lock, 4000 held, max delivery 1] {figures}")
    assert figures["settlement_lost"] == 0
    assert figures["duplicates"] == 0
    assert figures["silences"] == 0


@pytest.mark.timeout(300)
def test_a_connection_reset_under_a_held_batch_burns_no_delivery_count(
    scenario: Callable[..., Any], tmp_path: Path
) -> None:
    """Every connection reset while 1,000 are held (lock 20 s): the old link's messages complete by lock token."""
    broker, worker, requests, proxy = scenario(1000, "PT20S", proxy=True)
    worker.wait_holding(1000)
    proxy.reset_after(0)
    # The next bytes on each live connection (a renewal, a heartbeat) reset it.
    wait_for(lambda: proxy.stats.resets >= 1, 60, "a reset on a live connection")
    proxy.pass_through()
    worker.disk.full.clear()
    figures = finish(broker, worker, requests, tmp_path / "rows.jsonl")
    print(f"\n[reset under a held batch, 20 s lock, 1000 held, max delivery 1] {figures} resets={proxy.stats.resets}")
    assert figures["settlement_lost"] == 0
    assert figures["settled_by_token"] > 0
