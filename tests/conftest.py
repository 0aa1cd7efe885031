"""Suite-wide scheduling: how many processes run the default suite, and in which order tests start.

Most of the suite's wall time is waiting (SDK links opening and closing, worker subprocesses,
lock expiry), so the default run spreads tests over more processes than there are cores. A
targeted run (``pytest tests/unit/test_x.py``) stays in one process, which starts faster.

The longest tests start first, so that none of them begins last and alone: their order comes from
``tests/durations.json``, each test's time as recorded by a whole run with ``--record-durations``
(``make durations``). A test the file does not know (new, or under a second) falls back to the
integration-first rule. Only the order depends on the file: a stale or missing entry costs time,
never a test.
"""

from __future__ import annotations

import json
import os
import signal
from collections import defaultdict
from pathlib import Path

import pytest

#: Each test's seconds (setup, call and teardown) in a recorded run, longest first.
DURATIONS = Path(__file__).with_name("durations.json")
#: Tests shorter than this are left out of the file: where they start makes no difference.
RECORD_AT_LEAST = 1.0


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--record-durations``: write this run's test times to tests/durations.json."""
    parser.addoption(
        "--record-durations",
        action="store_true",
        help=f"write each test's time to {DURATIONS.name} (for the next runs' order; see tests/conftest.py)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Let Ctrl-C reach the commands tests start; record durations in the controlling process only.

    A run started in the background by a non-interactive shell (``make test &``, a CI job) inherits
    SIGINT *ignored*, every command a test starts inherits that, and Python then never raises
    ``KeyboardInterrupt``: the Ctrl-C tests would wait out their SIGINT as if the command hung. A
    command typed at a terminal has SIGINT at its default, the case those tests are about; a handled
    signal is reset to its default across ``exec``, an ignored one is not, so handle it here.
    (Under xdist the workers report durations to the controlling process.)
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if config.getoption("--record-durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(DurationRecorder(DURATIONS), "duration-recorder")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default in pyproject): 6 processes for the whole suite, none for a targeted run."""
    if config.args_source is pytest.Config.ArgsSource.ARGS:
        return 0
    return int(os.environ.get("AB_WORKER_TEST_PROCESSES", "6"))


def recorded_durations(path: Path = DURATIONS) -> dict[str, float]:
    """The recorded seconds per test id; empty when there is no file yet."""
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return {}


def start_order(item: pytest.Item, recorded: dict[str, float]) -> tuple[int, float]:
    """Recorded tests first, longest first; then the other integration tests (they wait more than
    they compute); then the rest."""
    seconds = recorded.get(item.nodeid)
    if seconds is not None:
        return 0, -seconds
    return (1 if item.get_closest_marker("integration") else 2), 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Sort the run by :func:`start_order` (stable: file order within a group)."""
    recorded = recorded_durations()
    items.sort(key=lambda item: start_order(item, recorded))


class DurationRecorder:
    """Adds up each test's phases as the reports arrive and merges them into the durations file.

    A whole run rewrites every entry it ran; a targeted run updates only its own tests. Tests that
    ran under :data:`RECORD_AT_LEAST` are dropped from the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        durations = recorded_durations(self.path)
        for node_id, seconds in self.seconds.items():
            if seconds >= RECORD_AT_LEAST:
                durations[node_id] = round(seconds, 1)
            else:
                durations.pop(node_id, None)
        ordered = dict(sorted(durations.items(), key=lambda entry: (-entry[1], entry[0])))
        self.path.write_text(json.dumps(ordered, indent=0) + "\n", encoding="utf-8")
