"""``run --drain`` against a broker it cannot reach ends with status 5 and the reason, instead of waiting forever.

Two ways a broker is unreachable: a closed port (the connection is refused at once, and the SDK's own
retries end each attempt) and a port that accepts TCP but never speaks (a half-open path: the
watchdog ends each attempt). With ``AB_WORKER_SERVICEBUS_TRY_TIMEOUT=1`` the drain gives up after
3 s of failed attempts, so both runs end in well under a minute; the subprocess timeout is only the
fail-safe that turns the old behaviour, waiting forever, into a failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.local.broker import LocalBroker
from adapters.local.faultproxy import FaultProxy
from worker.cli.common import ExitStatus

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
CONFIG = str(REPO / "deploy" / "experiments.yaml")
#: Far above the ~25 s the slower (silent) case takes on an idle machine; a hung drain meets it.
FAIL_SAFE_SECONDS = 240


def _connection_string(port: int) -> str:
    return (
        f"Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=RootManageSharedAccessKey;"
        "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true"
    )


def _drain(connection_string: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("AB_WORKER_", "APPLICATIONINSIGHTS_"))}
    env.update(
        AB_WORKER_SERVICEBUS_CONNECTION_STRING=connection_string,
        AB_WORKER_SERVICEBUS_TRY_TIMEOUT="1",
        AB_WORKER_HEALTH_PORT="0",
    )
    command = [sys.executable, "-m", "worker", "run", "--config", CONFIG, "--drain", *extra]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=FAIL_SAFE_SECONDS, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"run --drain was still waiting after {FAIL_SAFE_SECONDS} s: {str(exc.stderr)[-1500:]}")


def _error_line(stderr: str) -> str:
    (line,) = _error_lines(stderr)
    return line


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ab-worker run: error:")]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound by nobody that listens: connections to it are refused, and no other test takes it meanwhile."""
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        yield reserved.getsockname()[1]


def test_a_closed_port_ends_the_drain_with_status_5_and_the_reason(closed_port: int) -> None:
    """Connection refused on every attempt: exit 5, one line naming the broker, the bound and the refusal."""
    result = _drain(_connection_string(closed_port))
    assert result.returncode == ExitStatus.UNREACHABLE, result.stderr[-2000:]
    line = _error_line(result.stderr)
    assert "the broker could not be reached" in line
    assert "--drain gives up after 3 s (3 x AB_WORKER_SERVICEBUS_TRY_TIMEOUT)" in line
    assert "Connection refused" in line
    assert "SAS_KEY_VALUE" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_that_never_speaks_ends_the_drain_with_status_5() -> None:
    """TCP accepted, then silence (a blackhole in front of a live broker): exit 5 with the reason, not a hang."""
    with LocalBroker() as broker, FaultProxy(broker.port) as proxy:
        proxy.blackhole()
        result = _drain(proxy.connection_string(broker.connection_string))
        assert proxy.stats.blackholed_connections >= 1, "the worker never reached the silent port"
    assert result.returncode == ExitStatus.UNREACHABLE, result.stderr[-2000:]
    line = _error_line(result.stderr)
    assert "the broker could not be reached" in line
    assert "--drain gives up after 3 s" in line
    assert "Traceback" not in result.stderr


def test_processes_that_give_up_end_the_supervised_drain_with_status_5_and_the_reason(closed_port: int) -> None:
    """run --processes 2 --drain: each process exits 5 after the bound; the supervisor restarts neither and ends 5,
    its own last line naming them and the reason (it used to restart them for ever)."""
    result = _drain(_connection_string(closed_port), "--processes", "2")
    assert result.returncode == ExitStatus.UNREACHABLE, result.stderr[-2000:]
    *children, supervisor = _error_lines(result.stderr)
    assert len(children) == 2, result.stderr[-3000:]  # each process once: none was started again
    assert all("the broker could not be reached" in line for line in children)
    assert result.stderr.strip().splitlines()[-1] == supervisor
    assert supervisor.startswith("ab-worker run: error: processes 1, 2 of 2 gave up (--drain); process 1: ")
    assert "the broker could not be reached" in supervisor
    assert "--drain gives up after 3 s" in supervisor
    assert "Connection refused" in supervisor
    assert "restarting" not in result.stderr
    assert "SAS_KEY_VALUE" not in result.stderr
    assert "Traceback" not in result.stderr
