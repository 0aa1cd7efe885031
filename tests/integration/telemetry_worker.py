"""Runs the real pump with Application Insights telemetry in a process of its own (for test_telemetry).

The Azure Monitor distro installs the OpenTelemetry global providers, which the API allows once per
process; running each scenario in a fresh interpreter keeps the test process's globals untouched and
mirrors production, where the composition root configures telemetry once at start-up.

Usage: ``APPLICATIONINSIGHTS_CONNECTION_STRING=… python -m tests.integration.telemetry_worker N [outage]``.
Prints one JSON line with what the pump did and how long it took. With ``outage`` the second half of
the requests is sent only once the exporter has tried to reach the endpoint: it is processed while
that export fails or hangs.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from adapters.memory import MemoryPublisher, MemorySink, MemorySource
from adapters.telemetry import configure_telemetry
from worker.bootstrap import bootstrap
from worker.domain.registry import ExperimentRegistry
from worker.service.observe import PumpStats
from worker.service.pump import PumpConfig
from worker.service.redaction import install_log_redaction

EXPERIMENT = "exp_tone"
REGISTRY = {"experiments": [{"id": EXPERIMENT, "split": {"A": 0.5, "B": 0.5}}]}


def request_body(i: int) -> str:
    """A request whose context holds a personal value that must never leave the worker."""
    return json.dumps(
        {
            "user_id": f"U{i}",
            "experiment_id": EXPERIMENT,
            "context": {"email": f"person{i}@example.com", "country": "NL"},
        }
    )


class Connections:
    """Every host this process opens a socket to, and the threads that opened them (an audit hook sees
    connects from any library)."""

    def __init__(self) -> None:
        self.hosts: set[str] = set()
        self.threads: set[str] = set()
        self.attempted = threading.Event()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        if event == "socket.connect" and len(args) > 1 and isinstance(args[1], tuple) and args[1]:
            self.hosts.add(str(args[1][0]))
            self.threads.add(threading.current_thread().name)
            self.attempted.set()


def main(argv: list[str]) -> int:
    """Run ``argv[0]`` requests through the pump with App Insights telemetry; print a JSON summary."""
    count = int(argv[0])
    through_an_outage = argv[1:] == ["outage"]
    connections = Connections()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    install_log_redaction()
    # Generous export and flush budgets: a busy machine must not drop spans the healthy run counts. The
    # outage run keeps the worker's own 5 s shutdown budget (what a hung endpoint must not outlast).
    telemetry = configure_telemetry("appinsights", sampling_ratio=1.0, export_interval_s=0.5, export_timeout_s=10.0)
    source = MemorySource()
    first = count // 2 if through_an_outage else count
    for i in range(first):
        source.send(request_body(i))

    sent = [first]

    def until(stats: PumpStats) -> bool:
        # The rest goes in once an export has been tried (and failed, or hangs): it must be processed
        # all the same, while the exporter struggles.
        if sent[0] < count and stats.settled >= first and connections.attempted.is_set():
            for i in range(first, count):
                source.send(request_body(i))
            sent[0] = count
        return stats.settled >= count

    registry = ExperimentRegistry.from_dict(REGISTRY)
    pump = bootstrap(
        source=source,
        publisher=MemoryPublisher(),
        sink=MemorySink(max_rows=50),
        registry=lambda: registry,
        config=PumpConfig(max_batch=50, context_allow_list=("country",)),
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    logging.getLogger("worker.telemetry_test").warning("pump starting with %d requests", count)
    started = time.perf_counter()
    stats = pump.run(until=until) if through_an_outage else pump.run(idle_exit=0)
    connecting_threads = sorted(connections.threads)
    run_seconds = time.perf_counter() - started
    started = time.perf_counter()
    flushed = telemetry.shutdown(timeout=5.0 if through_an_outage else 30.0)
    shutdown_seconds = time.perf_counter() - started
    summary = {
        "received": stats.received,
        "completed": stats.completed,
        "abandoned": stats.abandoned,
        "dead_letters": sum(stats.dead_letters.values()),
        "run_seconds": run_seconds,
        "shutdown_seconds": shutdown_seconds,
        "flushed": flushed,
        "connected_to": sorted(connections.hosts),
        "connecting_threads_while_running": connecting_threads,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
