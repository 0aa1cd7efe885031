"""The process supervisor behind ``run --processes N``, driven with small stand-in child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_for
from worker.service import supervisor as supervisor_module
from worker.service.supervisor import Supervisor, SupervisorConfig, process_count

# A child that serves the worker's probes on AB_WORKER_HEALTH_PORT and behaves as CHILD_MODE says.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    mode = os.environ.get("CHILD_MODE", "serve")
    index = os.environ["CHILD_INDEX"]
    marks = os.environ["CHILD_MARKS"]
    with open(os.path.join(marks, f"start-{index}-{time.monotonic_ns()}"), "w"):
        pass
    if mode == "crash" and index == "1":
        sys.exit(3)
    if mode == "unreachable":
        print("a log line of the child's", file=sys.stderr)
        print(f"ab-worker run: error: the broker could not be reached (process {index})", file=sys.stderr)
        sys.exit(5)
    if mode == "finish":
        sys.exit(0)
    stop = threading.Event()
    if mode == "stubborn":
        # Notes the SIGTERM, then keeps serving for 60 s before it stops by itself: a supervisor that
        # waited it out instead of killing it at the drain deadline would see it exit 0.
        def stubborn(*_):
            open(os.path.join(marks, f"term-{index}"), "w").close()
            threading.Timer(60, stop.set).start()

        signal.signal(signal.SIGTERM, stubborn)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

    class Probe(BaseHTTPRequestHandler):
        def do_GET(self):
            ready = mode not in ("unready", "dead")
            ok = (self.path == "/healthz" and mode != "dead") or ready
            detail = "pump loop stuck for 130 s" if mode == "dead" else "event topic down: test"
            body = json.dumps({"detail": "ok" if ready else detail}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", int(os.environ["AB_WORKER_HEALTH_PORT"])), Probe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while not stop.is_set():
        time.sleep(0.05)
    sys.exit(0)
    """
)


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., tuple[Supervisor, threading.Thread, list[int]]]]:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    marks = tmp_path / "marks"
    marks.mkdir()
    started: list[tuple[Supervisor, threading.Thread]] = []

    def start(
        mode: str,
        processes: int = 2,
        drain_deadline: float = 10.0,
        liveness_timeout: float = 120.0,
        give_up_status: int | None = None,
    ) -> tuple[Supervisor, threading.Thread, list[int]]:
        config = SupervisorConfig(
            processes=processes,
            command=[sys.executable, str(script)],
            env={"CHILD_MODE": mode, "CHILD_MARKS": str(marks), "PATH": "/usr/bin:/bin"},
            drain_deadline=drain_deadline,
            min_backoff=0.2,
            max_backoff=0.4,
            child_env=lambda index: {"CHILD_INDEX": str(index)},
            liveness_timeout=liveness_timeout,
            give_up_status=give_up_status,
        )
        supervisor = Supervisor(config)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
        thread.start()
        started.append((supervisor, thread))
        return supervisor, thread, result

    yield start
    for supervisor, thread in started:
        for child in supervisor.children:  # a test that failed with a child stopped must not wait on it
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGCONT)
        supervisor.stop()
        thread.join(30)


def starts(tmp_path: Path, index: int) -> int:
    return len(list((tmp_path / "marks").glob(f"start-{index}-*")))


def test_children_get_their_own_probe_ports_and_readiness_is_the_conjunction(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]],
) -> None:
    """Every child serves its probes on its own port; the supervisor is ready once all of them are."""
    supervisor, thread, result = supervise("serve", processes=3)
    assert len({child.health_port for child in supervisor.children}) == 3
    wait_for(lambda: supervisor.health()[1], what="every child ready")
    live, ready, detail = supervisor.health()
    assert (live, ready) == (True, True)
    assert detail == "ok (3 processes)"
    supervisor.stop()
    thread.join(60)
    assert not thread.is_alive()
    assert result == [0]
    assert all(child.exit_codes == [0] for child in supervisor.children)


def test_an_unready_child_makes_the_pod_unready_but_stays_live(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]],
) -> None:
    """A child whose dependency is down turns /readyz red with its reason; /healthz stays green."""
    supervisor, _, _ = supervise("unready")
    wait_for(lambda: supervisor.health()[2].count("event topic down") == 2, what="both children's reasons")
    live, ready, detail = supervisor.health()
    assert live
    assert not ready
    assert detail == "process 1: event topic down: test; process 2: event topic down: test"


def test_a_crashed_child_is_restarted_with_backoff_while_the_pod_stays_live(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]], tmp_path: Path
) -> None:
    """A child that exits non-zero is started again after a growing delay; its sibling is untouched."""
    supervisor, _, _ = supervise("crash")
    wait_for(lambda: starts(tmp_path, 1) >= 3, what="the crashing child's third start")
    first, second = supervisor.children
    assert 3 in first.exit_codes
    assert first.restarts >= 2
    assert second.exit_codes == []
    assert second.running
    live, ready, _ = supervisor.health()
    assert live
    assert not ready


def test_sigterm_drains_every_child_and_kills_what_outlives_the_deadline(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]], tmp_path: Path
) -> None:
    """Children that ignore SIGTERM are killed once the drain deadline has passed, never waited out.

    Each stubborn child is sent SIGTERM first (it notes it), and would stop by itself 60 s later: killed
    (-9) rather than exiting 0 means the supervisor did not wait for it. That it waited the deadline
    first is a lower bound a busy machine cannot break (a busy machine only makes the kill later).
    """
    supervisor, thread, result = supervise("stubborn", drain_deadline=1.0)
    wait_for(lambda: supervisor.health()[1], what="both children ready")
    began = time.monotonic()
    supervisor.stop()
    thread.join(60)
    assert not thread.is_alive()
    elapsed = time.monotonic() - began
    assert sorted(path.name for path in (tmp_path / "marks").glob("term-*")) == ["term-1", "term-2"]
    assert all(child.exit_codes == [-signal.SIGKILL] for child in supervisor.children)
    assert elapsed >= 1.0, elapsed
    assert result == [1]


def test_children_that_finish_by_themselves_end_the_run(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]], tmp_path: Path
) -> None:
    """With --drain every child exits 0 once the queue is empty: nothing is restarted and the run ends 0."""
    _supervisor, thread, result = supervise("finish")
    thread.join(60)
    assert not thread.is_alive()
    assert result == [0]
    assert starts(tmp_path, 1) == 1
    assert starts(tmp_path, 2) == 1


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("4", 4), (" auto ", 5), ("AUTO", 5)])
def test_process_count(text: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--processes`` takes 1–64 or ``auto``: the cores this process may use (5 here, as the CPU count says)."""
    monkeypatch.setattr(supervisor_module, "usable_cpus", lambda: 5)
    assert process_count(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "65", "two"])
def test_process_count_refuses_nonsense(text: str) -> None:
    """Zero, negative, huge and non-numeric counts are errors, not silently clamped."""
    with pytest.raises(ValueError, match=text):
        process_count(text)


def _pid(supervisor: Supervisor, index: int) -> int | None:
    process = supervisor.children[index - 1].process
    return None if process is None else process.pid


@pytest.mark.timeout(120)
def test_a_stopped_child_fails_healthz_naming_it_and_is_replaced(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]],
) -> None:
    """SIGSTOP one child: within the liveness timeout /healthz fails naming it (it cannot drain while
    stopped, so it stays failed until the drain deadline); let it run: it drains and is started again."""
    # 10 s: a healthy child must miss ten 1 s probes in a row to be taken for wedged on a busy machine.
    supervisor, _, _ = supervise("serve", drain_deadline=300.0, liveness_timeout=10.0)
    wait_for(lambda: supervisor.health()[1], what="every child ready")
    stopped = _pid(supervisor, 2)
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)

    wait_for(lambda: not supervisor.health()[0], 60, "/healthz to fail for the stopped child")

    live, ready, detail = supervisor.health()
    assert (live, ready) == (False, False)
    assert "process 2: wedged: has not answered its probe for" in detail
    assert "process 1" not in detail
    os.kill(stopped, signal.SIGCONT)  # the SIGTERM it was sent is delivered now: it drains and exits
    wait_for(lambda: _pid(supervisor, 2) not in (None, stopped) and supervisor.health()[1], 60, "a new child 2")
    assert supervisor.health() == (True, True, "ok (2 processes)")
    second = supervisor.children[1]
    assert second.exit_codes[-1] == 0
    assert second.replacements >= 1
    assert supervisor.children[0].exit_codes == []


@pytest.mark.timeout(120)
def test_a_stopped_child_is_killed_at_the_drain_deadline_and_started_again(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]],
) -> None:
    """A wedged child that cannot act on SIGTERM is killed once the drain deadline has passed; a new one runs."""
    supervisor, _, _ = supervise("serve", drain_deadline=0.5, liveness_timeout=10.0)
    wait_for(lambda: supervisor.health()[1], what="every child ready")
    stopped = _pid(supervisor, 1)
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)

    wait_for(lambda: -signal.SIGKILL in supervisor.children[0].exit_codes, 60, "the stopped child to be killed")

    wait_for(lambda: _pid(supervisor, 1) not in (None, stopped) and supervisor.health()[1], 60, "a new child 1")
    assert supervisor.health() == (True, True, "ok (2 processes)")
    assert supervisor.children[1].exit_codes == []


def test_a_child_that_answers_it_is_not_live_is_replaced(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]], tmp_path: Path
) -> None:
    """A child whose own /healthz fails (its pump wedged) is replaced too, not left for the kubelet."""
    supervisor, _, _ = supervise("dead", processes=1, drain_deadline=5.0)
    wait_for(lambda: starts(tmp_path, 1) >= 2, 60, "the dead child to be started again")
    assert supervisor.children[0].replacements >= 1
    assert 0 in supervisor.children[0].exit_codes


def test_with_drain_children_that_give_up_end_the_run_with_their_status_and_reason(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """``run --processes N --drain``: a child that exits 5 (its dependency stayed unreachable) is not restarted;
    once every child has ended the run ends 5, with each one's last error line as its reason."""
    supervisor, thread, result = supervise("unreachable", give_up_status=5)
    thread.join(60)
    assert not thread.is_alive(), "the supervisor restarted children that gave up"
    assert result == [5]
    assert starts(tmp_path, 1) == 1
    assert starts(tmp_path, 2) == 1
    assert supervisor.gave_up() == [
        (1, "the broker could not be reached (process 1)"),
        (2, "the broker could not be reached (process 2)"),
    ]
    assert supervisor.health()[2] == (
        "process 1: gave up: the broker could not be reached (process 1); "
        "process 2: gave up: the broker could not be reached (process 2)"
    )
    err = capfd.readouterr().err
    assert "a log line of the child's" in err, "the child's stderr was not passed on"
    assert "ab-worker run: error: the broker could not be reached (process 2)" in err


def test_without_drain_a_child_that_exits_5_is_restarted_with_backoff(
    supervise: Callable[..., tuple[Supervisor, threading.Thread, list[int]]], tmp_path: Path
) -> None:
    """A long-running supervisor keeps trying: exit 5 is restarted like any other failure, with backoff."""
    supervisor, thread, _ = supervise("unreachable")
    wait_for(lambda: starts(tmp_path, 1) >= 3 and starts(tmp_path, 2) >= 3)
    assert thread.is_alive()
    assert supervisor.gave_up() == []
    assert supervisor.children[0].restarts >= 2
