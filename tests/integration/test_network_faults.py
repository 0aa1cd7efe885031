"""Network faults between the worker and Service Bus, through the TCP fault proxy.

The worker is the real one, built by the composition root (``bootstrap.bootstrap``) with the
real SDK, connected to the embedded broker through :class:`~adapters.local.faultproxy.FaultProxy`,
with ``/readyz`` served over HTTP and probed every 100 ms. Each scenario publishes requests straight
to the broker, lets the worker get going, injects one fault, clears it, and proves:

* lost = 0: every request ends as its event on the topic and its row (duplicates identical), nothing
  left on the queue, nothing dead-lettered (:func:`tests.integration.test_faults.assert_no_loss`);
* ``/readyz`` answered 503 during a fault that stops progress;
* the worker recovered by itself (ready, and completing again) within 60 s of the fault clearing.

Short SDK bounds via settings (``AB_WORKER_SERVICEBUS_TRY_TIMEOUT=2``, ``..._PROBE_AFTER=3``) keep each
scenario well under a minute; ``pytest -s`` prints the measured detection and recovery times.
"""

from __future__ import annotations

import gc
import http.client
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from adapters.health import HealthServer
from adapters.local.broker import LocalBroker
from adapters.local.faultproxy import FaultProxy
from adapters.servicebus import ServiceBusAuth, ServiceBusPublisher, ServiceBusSource, create_client
from adapters.servicebus.liveness import Liveness
from tests.integration.test_faults import (
    ALL,
    DROPPED_CONNECTION_WARNINGS,
    EXPERIMENTS,
    QUEUE,
    TOPIC,
    Requests,
    assert_no_loss,
    broker_config,
    drain_events,
    read_rows,
)
from tests.waiting import wait_for
from worker import bootstrap
from worker.domain.errors import TransientError
from worker.domain.registry import ExperimentRegistry
from worker.service.ports import OutboundEvent
from worker.service.settings import WorkerSettings

pytestmark = [
    pytest.mark.integration,
    *DROPPED_CONNECTION_WARNINGS,
]

#: How soon after a fault clears the worker must be ready and completing again (issue 10, D12).
RECOVERY_BOUND = 60.0


@dataclass
class Timeline:
    """What the prober saw: (t, /readyz status, completed) every 100 ms."""

    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def first(self, after: float, condition: Callable[[int, int], bool]) -> float | None:
        """The first sample time after ``after`` where ``condition(status, completed)`` holds."""
        return next((t for t, status, done in self.samples if t >= after and condition(status, done)), None)

    def completed_at(self, when: float) -> int:
        """Completions counted by the last sample at or before ``when``."""
        return max((done for t, _, done in self.samples if t <= when), default=0)


class RunningWorker:
    """The worker (pump + health server from the composition root) through the proxy, in this process."""

    def __init__(self, broker: LocalBroker, proxy: FaultProxy, rows: Path) -> None:
        settings = WorkerSettings(
            servicebus_connection_string=SecretStr(proxy.connection_string(broker.connection_string)),
            servicebus_try_timeout=2.0,
            servicebus_probe_after=3.0,
            max_batch=50,
            max_wait=1.0,
            prefetch=0,
            health_port=0,
        )
        registry = ExperimentRegistry.from_dict(EXPERIMENTS)
        self.pump = bootstrap.bootstrap(settings, registry=lambda: registry, rows_path=str(rows))
        self.health = HealthServer(self.pump.health, host="127.0.0.1", port=0).start()
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.pump.run, name="pump", daemon=True)
        self._prober = threading.Thread(target=self._probe, name="readyz-prober", daemon=True)

    def start(self) -> RunningWorker:
        """Start the pump and the /readyz prober."""
        self._thread.start()
        self._prober.start()
        return self

    def readyz(self) -> int:
        """GET /readyz over HTTP; the status code (0 when no answer came: a sample that is neither)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.health.port, timeout=10)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            conn.close()

    def _probe(self) -> None:
        while not self._stop.wait(0.1):
            self.timeline.samples.append((time.monotonic(), self.readyz(), self.pump.stats.completed))

    def stop(self) -> None:
        """Stop the pump (drain, which closes the client too), the prober and the health server."""
        self.pump.stop()
        self._thread.join(timeout=60)
        self._stop.set()
        self._prober.join(timeout=10)
        self.health.stop()
        assert not self._thread.is_alive(), "the pump did not stop"


@dataclass
class Scenario:
    """One fault run and its measurements."""

    name: str
    broker: LocalBroker
    proxy: FaultProxy
    worker: RunningWorker
    requests: Requests
    rows: Path
    fault_on: float = 0.0
    fault_off: float = 0.0


@pytest.fixture
def scenario(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Scenario]:
    """Broker with 3,000 requests, proxy, and the worker through it, already busy."""
    requests = Requests.make(3000)
    with LocalBroker(broker_config("PT5S", max_delivery=10)) as broker, FaultProxy(broker.port) as proxy:
        requests.publish(broker.connection_string)
        rows = tmp_path / "rows.jsonl"
        worker = RunningWorker(broker, proxy, rows).start()
        try:
            wait_for(lambda: broker.message_counts(ALL)["active"] >= 200, 60, "the worker to get going")
            yield Scenario(request.node.name, broker, proxy, worker, requests, rows)
        finally:
            proxy.recover()
            worker.stop()
    gc.collect()


def fault(s: Scenario, inject: Callable[[], None], *, stops_progress: bool, hold: float) -> None:
    """Inject, hold (until /readyz says 503 when the fault stops progress, then ``hold`` more), clear."""
    s.fault_on = time.monotonic()
    inject()
    if stops_progress:
        wait_for(lambda: s.worker.timeline.first(s.fault_on, lambda st, _: st == 503) is not None, 45, "/readyz 503")
    time.sleep(hold)
    s.fault_off = time.monotonic()
    s.proxy.recover()


def finish_and_prove(s: Scenario, *, stops_progress: bool) -> dict[str, Any]:
    """Wait for the queue to drain, check recovery bounds and lost = 0; the measured figures."""
    total = len(s.requests.by_id)
    wait_for(lambda: s.worker.pump.stats.completed >= total or _queue_empty(s.broker), 120, "the queue to drain")
    timeline = s.worker.timeline
    # The last completions may land just after the fault cleared: let the prober see them.
    drained = time.monotonic()
    wait_for(lambda: timeline.samples[-1][0] > drained, 30, "a probe after the drain")
    progress = timeline.completed_at(s.fault_off)
    resumed = timeline.first(s.fault_off, lambda _, done: done > progress)
    ready_again = timeline.first(s.fault_off, lambda st, _: st == 200)
    not_ready = timeline.first(s.fault_on, lambda st, _: st == 503)
    s.worker.stop()
    events = drain_events(s.broker.connection_string, s.broker)
    rows, broken = read_rows(s.rows)
    assert not broken, f"torn rows: {broken[:3]}"
    proof = assert_no_loss(s.requests, events, rows, s.broker)
    figures: dict[str, Any] = {
        "detected_s": None if not_ready is None else round(not_ready - s.fault_on, 1),
        "recovered_s": None if resumed is None else round(resumed - s.fault_off, 1),
        "ready_again_s": None if ready_again is None else round(ready_again - s.fault_off, 1),
        "duplicates": proof.duplicate_events,
        "settlement_lost": s.worker.pump.stats.settlement_lost,
        "proxy": s.proxy.stats,
    }
    print(f"\n[{s.name}] requests={proof.requests} lost=0 dead_lettered=0 {figures}")
    if stops_progress:
        assert not_ready is not None, "/readyz never said 503 during the fault"
        assert not_ready < s.fault_off, "/readyz said 503 only after the fault cleared"
    assert ready_again is not None, "never ready again"
    assert ready_again - s.fault_off <= RECOVERY_BOUND, figures
    if progress < total:
        assert resumed is not None, "never completed anything again"
        assert resumed - s.fault_off <= RECOVERY_BOUND, figures
    return figures


def _queue_empty(broker: LocalBroker) -> bool:
    counts = broker.message_counts(QUEUE)
    return counts["active"] == 0 and counts["locked"] == 0


@pytest.mark.timeout(150)
def test_latency_each_way_loses_nothing(scenario: Scenario) -> None:
    """20 ms each way for 6 s: slower, never stuck, nothing lost."""
    fault(scenario, lambda: scenario.proxy.latency(0.02), stops_progress=False, hold=6.0)
    figures = finish_and_prove(scenario, stops_progress=False)
    assert figures["proxy"].bytes_forwarded > 0


@pytest.mark.timeout(150)
def test_reset_mid_frame_loses_nothing_and_recovers(scenario: Scenario) -> None:
    """Every connection is reset 3,000 bytes in (mid-frame) for a while: 503, then recovery, nothing lost."""
    fault(scenario, lambda: scenario.proxy.reset_after(3000), stops_progress=True, hold=3.0)
    figures = finish_and_prove(scenario, stops_progress=True)
    assert figures["proxy"].resets > 0


@pytest.mark.timeout(150)
def test_blackhole_is_detected_and_the_worker_recovers(scenario: Scenario) -> None:
    """Half-open connections (no byte either way, never closed): 503 within seconds, recovery, nothing lost.

    Before the fix the worker hung forever in a send waiting for the broker's disposition, with
    /readyz green throughout.
    """
    fault(scenario, scenario.proxy.blackhole, stops_progress=True, hold=3.0)
    figures = finish_and_prove(scenario, stops_progress=True)
    assert figures["proxy"].blackholed_connections > 0
    assert figures["detected_s"] is not None
    assert figures["detected_s"] <= 40


@pytest.mark.timeout(150)
def test_slow_drip_loses_nothing_and_recovers(scenario: Scenario) -> None:
    """One byte per 5 ms each way: too slow to finish an attempt in time; 503, recovery, nothing lost."""
    fault(scenario, lambda: scenario.proxy.slow_drip(0.005), stops_progress=True, hold=3.0)
    finish_and_prove(scenario, stops_progress=True)


# -- each bound on its own ---------------------------------------------------------------------


@pytest.fixture
def blackholed(clients: list[Any]) -> Iterator[tuple[LocalBroker, FaultProxy, Any]]:
    """Broker with 20 requests, a proxy to it, and an SDK client through the proxy (try_timeout 1 s)."""
    with LocalBroker(broker_config("PT30S")) as broker, FaultProxy(broker.port) as proxy:
        Requests.make(20).publish(broker.connection_string)
        auth = ServiceBusAuth(connection_string=proxy.connection_string(broker.connection_string))
        client = create_client(auth, retry_total=1, retry_backoff_max=0.5, try_timeout=1.0)
        clients.append(client)
        yield broker, proxy, client


def receive_until_error(source: ServiceBusSource, attempts: int) -> None:
    """Receive until the source raises (it must within ``attempts`` empty receives)."""
    for _ in range(attempts):
        assert not source.receive(5, 0.5), "a message arrived through a blackhole"


@pytest.mark.timeout(60)
def test_quiet_receiver_on_a_silent_connection_is_probed_and_dropped(blackholed: Any) -> None:
    """An open receiver whose connection goes silent returns nothing, then fails its liveness peek: TransientError."""
    _, proxy, client = blackholed
    source = ServiceBusSource(client, QUEUE, liveness=Liveness(try_timeout=1.0, probe_after=1.0))
    try:
        assert source.receive(5, 2.0), "nothing received before the fault"
        proxy.blackhole()
        # Within 20 empty receives (a receiver that never probed would return nothing for ever).
        with pytest.raises(TransientError, match="liveness check"):
            receive_until_error(source, attempts=20)
    finally:
        source.close()
    assert source.watch.silences == 1
    assert source.reconnects == 1


@pytest.mark.timeout(120)
def test_a_handshake_that_never_answers_is_cut_by_the_watchdog(blackholed: Any) -> None:
    """A new connection accepted but silent blocks the SDK's handshake forever; the watchdog cuts it."""
    _, proxy, client = blackholed
    proxy.blackhole()
    source = ServiceBusSource(client, QUEUE, liveness=Liveness(try_timeout=1.0, probe_after=60.0))
    source.link_open_wait = 2.0
    publisher = ServiceBusPublisher(client, TOPIC, liveness=Liveness(try_timeout=1.0))
    event = OutboundEvent(body=b"{}", message_id="e-1", correlation_id="c-1", application_properties={})
    try:
        started = time.monotonic()
        with pytest.raises(TransientError):
            source.receive(5, 1.0)
        receive_took = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(TransientError):
            publisher.publish([event])
        publish_took = time.monotonic() - started
    finally:
        source.close()
        publisher.close()
    assert source.watch.watchdog.aborts >= 1
    assert publisher.watch.watchdog.aborts >= 1
    # Hang guards (the handshake never answers: without the watchdog neither call would return).
    assert receive_took < 45
    assert publish_took < 45
