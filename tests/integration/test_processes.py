"""``ab-worker run --processes N``: one supervisor, N pump processes on one queue, a killed one restarted."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from adapters.local.broker import LocalBroker
from tests.integration.test_faults import (
    Requests,
    WorkerProcess,
    assert_no_loss,
    broker_config,
    busy,
    drain_events,
    read_rows,
    worker_env,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children(pid: int) -> set[int]:
    """The direct child processes of ``pid`` (Linux /proc)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(child) for child in text.split()}


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        # The status is the verdict, not how fast a busy machine answers: a generous timeout.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, json.load(answer)["detail"]
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused)["detail"]
    except OSError:
        return 0, "no answer"


def _wait_for_two_pumps(worker: WorkerProcess, health: int) -> None:
    """Until the supervisor runs its two pump processes and says it is ready."""
    wait_for(
        lambda: len(children(worker.proc.pid)) == 2,
        90,
        "two pump processes",
        detail=lambda: f"exit status {worker.proc.poll()}; {worker.stderr[-2000:]}",
    )
    wait_for(lambda: probe(health, "/readyz")[0] == 200, 60, "the supervisor's /readyz to be 200")


@pytest.mark.timeout(240)
def test_two_processes_drain_one_queue_and_a_killed_one_is_restarted_losing_nothing(tmp_path: Path) -> None:
    """Both children take requests; SIGKILL of one is repaired by the supervisor; lost = 0, duplicates identical."""
    requests = Requests.make(1500)
    with LocalBroker(broker_config("PT2S")) as broker:
        requests.publish(broker.connection_string)
        health = free_port()
        env = worker_env(broker.connection_string, PREFETCH="0", MAX_BATCH="50", HEALTH_PORT=str(health))
        worker = WorkerProcess(tmp_path, "supervised", env, "--processes", "2", "--drain")
        try:
            _wait_for_two_pumps(worker, health)
            assert probe(health, "/readyz") == (200, "ok (2 processes)")
            wait_for(busy(broker, 300), 60, "the processes to be mid-run")
            # Both take requests from the one queue: each has flushed rows before one is killed.
            wait_for(
                lambda: (
                    all(
                        (tmp_path / f"rows-{i}.jsonl").stat().st_size > 0
                        for i in (1, 2)
                        if (tmp_path / f"rows-{i}.jsonl").exists()
                    )
                    and all((tmp_path / f"rows-{i}.jsonl").exists() for i in (1, 2))
                ),
                60,
                "both processes to write rows",
            )
            first = children(worker.proc.pid)
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            # The pod stays live while the supervisor restarts the child (readiness may dip).
            assert probe(health, "/healthz")[0] == 200
            wait_for(lambda: len(children(worker.proc.pid) - first) == 1, 30, "the killed process to be restarted")
            assert worker.wait(150) == 0, worker.stderr[-3000:]
        finally:
            worker.kill()
        rows: dict[str, list[str]] = defaultdict(list)
        for index in (1, 2):
            found, broken = read_rows(tmp_path / f"rows-{index}.jsonl")
            assert broken == []
            assert found, f"process {index} wrote no rows: both must take requests"
            for event_id, lines in found.items():
                rows[event_id].extend(lines)
        events = drain_events(broker.connection_string, broker)
        assert_no_loss(requests, events, rows, broker)
    assert "exited with -9; restarting" in worker.stderr


def test_processes_refuse_input_and_demo(tmp_path: Path) -> None:
    """--processes runs against a broker only: combining it with --input is a one-line usage error."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("{}\n", encoding="utf-8")
    env = worker_env("Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true")
    worker = WorkerProcess(tmp_path, "refused", env, "--processes", "2", "--input", str(requests))
    try:
        assert worker.wait(60) == 2
    finally:
        worker.kill()
    lines = worker.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--processes" in lines[0]
    assert "Traceback" not in worker.stderr


@pytest.mark.timeout(300)
def test_a_stopped_process_fails_healthz_naming_it_and_is_replaced_losing_nothing(tmp_path: Path) -> None:
    """SIGSTOP one pump process (issue 16 §5): /healthz turns 503 naming it within the liveness timeout, not
    "ok (2 processes)" for ever; it is sent SIGTERM, and once it can act on it, it drains and a new one starts."""
    requests = Requests.make(1500)
    with LocalBroker(broker_config("PT5S")) as broker:
        requests.publish(broker.connection_string)
        health = free_port()
        env = worker_env(
            broker.connection_string,
            PREFETCH="0",
            MAX_BATCH="50",
            HEALTH_PORT=str(health),
            LIVENESS_TIMEOUT="26",  # the floor at the default timeouts: a pump may pause that long and be well
            DRAIN_DEADLINE="120",  # a stopped process cannot drain: /healthz stays 503 until it is let go
        )
        worker = WorkerProcess(tmp_path, "supervised", env, "--processes", "2", "--drain")
        victim = 0
        try:
            _wait_for_two_pumps(worker, health)
            wait_for(busy(broker, 300), 60, "the processes to be mid-run")
            first = children(worker.proc.pid)
            victim = min(first)
            os.kill(victim, signal.SIGSTOP)

            wait_for(lambda: probe(health, "/healthz")[0] == 503, 120, "/healthz to fail for the stopped process")

            status, detail = probe(health, "/healthz")
            assert status == 503
            assert re.search(r"process [12]: wedged: has not answered its probe for \d+ s; replacing it", detail)
            os.kill(victim, signal.SIGCONT)  # it acts on the SIGTERM it was sent: drains and exits
            assert worker.wait(150) == 0, worker.stderr[-3000:]
        finally:
            if victim:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
            if worker.proc.poll() is None:  # a failed test must not leave pump processes behind it
                for pid in children(worker.proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            worker.kill()
        rows: dict[str, list[str]] = defaultdict(list)
        for index in (1, 2):
            found, broken = read_rows(tmp_path / f"rows-{index}.jsonl")
            assert broken == []
            for event_id, lines in found.items():
                rows[event_id].extend(lines)
        events = drain_events(broker.connection_string, broker)
        assert_no_loss(requests, events, rows, broker)
    assert re.search(r"process [12] \(wedged\) exited with 0; starting it again", worker.stderr), worker.stderr[-3000:]
