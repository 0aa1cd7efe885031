"""Runs the real pump with Application Insights telemetry in a process of its own (for test_telemetry).

The Azure Monitor distro installs the OpenTelemetry global providers, which the API allows once per
process; running each scenario in a fresh interpreter keeps the test process's globals untouched and
mirrors production, where the composition root configures telemetry once at start-up.

Usage: ``APPLICATIONINSIGHTS_CONNECTION_STRING=… python -m tests.integration.telemetry_worker N``.
Prints one JSON line with what the pump did and how long it took.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from adapters.memory import MemoryPublisher, MemorySink, MemorySource
from adapters.telemetry import configure_telemetry
from worker.bootstrap import bootstrap
from worker.domain.registry import ExperimentRegistry
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


def record_connections() -> set[str]:
    """Every host this process opens a socket to (an audit hook sees connects from any library)."""
    hosts: set[str] = set()

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event == "socket.connect" and len(args) > 1 and isinstance(args[1], tuple) and args[1]:
            hosts.add(str(args[1][0]))

    sys.addaudithook(hook)
    return hosts


def main(argv: list[str]) -> int:
    """Run ``argv[0]`` requests through the pump with App Insights telemetry; print a JSON summary."""
    count = int(argv[0])
    connections = record_connections()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    install_log_redaction()
    telemetry = configure_telemetry("appinsights", sampling_ratio=1.0, export_interval_s=0.5, export_timeout_s=2.0)
    source = MemorySource()
    for i in range(count):
        source.send(request_body(i))
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
    stats = pump.run(idle_exit=0)
    run_seconds = time.perf_counter() - started
    started = time.perf_counter()
    flushed = telemetry.shutdown(timeout=5.0)
    shutdown_seconds = time.perf_counter() - started
    summary = {
        "received": stats.received,
        "completed": stats.completed,
        "abandoned": stats.abandoned,
        "dead_letters": sum(stats.dead_letters.values()),
        "run_seconds": run_seconds,
        "shutdown_seconds": shutdown_seconds,
        "flushed": flushed,
        "connected_to": sorted(connections),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
