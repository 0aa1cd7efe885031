"""Runs the real pump into a rows file on a "disk" that fills up, in a process of its own.

``RLIMIT_FSIZE`` caps how large this process may grow any file (with ``SIGXFSZ`` ignored, a write
past it is short and the next one fails with ``EFBIG``), which is a full disk without root or a
mount. The limit is lifted once the pump has retried a few times, as an operator frees space.

Usage: ``python -m tests.unit.disk_full_worker ROWS_FILE LIMIT_BYTES``. Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import threading
from pathlib import Path

from adapters.files import JsonLinesSink
from adapters.memory import MemoryPublisher, MemorySource
from tests.waiting import wait_for
from worker.bootstrap import bootstrap
from worker.domain.registry import ExperimentRegistry
from worker.service.pump import PumpConfig

REQUESTS = 40
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_disk", "split": {"A": 0.5, "B": 0.5}}]})


def whole_lines(path: Path) -> bool:
    """True when the file is empty or ends in a newline and every line is JSON."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        return False
    try:
        [json.loads(line) for line in data.splitlines()]
    except ValueError:
        return False
    return True


def main(argv: list[str]) -> int:
    """Fill the disk under a running pump, then free it; report what happened."""
    path, limit = Path(argv[0]), int(argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    source = MemorySource()
    for i in range(REQUESTS):
        source.send(json.dumps({"user_id": f"U{i}", "experiment_id": "exp_disk"}), message_id=f"m{i}")
    sink = JsonLinesSink(path, max_rows=10, max_age=0.05)
    pump = bootstrap(
        source=source,
        publisher=MemoryPublisher(),
        sink=sink,
        registry=lambda: REGISTRY,
        config=PumpConfig(max_batch=10, min_backoff=0.02, max_backoff=0.1),
    )
    runner = threading.Thread(target=pump.run, kwargs={"idle_exit": 0.5})
    runner.start()
    # Fails this process, naming what it waited for, if the pump never holds through the full disk.
    wait_for(lambda: pump.stats.downstream_retries >= 3, what="three failed flushes into the full disk")
    held = True
    _, ready, detail = pump.health()
    whole_during_outage = whole_lines(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space freed
    runner.join(60)
    summary = {
        "held": held,
        "ready_during_outage": ready,
        "detail_during_outage": detail,
        "whole_during_outage": whole_during_outage,
        "completed": pump.stats.completed,
        "abandoned": pump.stats.abandoned,
        "dead_letters": sum(pump.stats.dead_letters.values()),
        "stopped": not runner.is_alive(),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
