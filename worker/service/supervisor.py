"""``ab-worker run --processes N``: one supervisor, N pump processes, so a pod uses its cores.

One Python process is bound to one core by the GIL. The supervisor starts N ordinary ``ab-worker
run`` processes (each with its own Service Bus connection: competing consumers on one queue, as
separate replicas would be), restarts a crashed one with exponential backoff, answers the probes for
all of them, and drains all of them on SIGTERM within the drain deadline.

Each child serves its own probes on a private 127.0.0.1 port; the supervisor polls them and
aggregates: live while every child is live or waiting to be restarted (a crash is the supervisor's
business, not the kubelet's), ready only while every child is ready.

A child that is wedged — it does not answer its probe for the liveness timeout (stopped, or stuck
so hard its probe thread cannot run), or it answers that it is not live — makes ``/healthz`` fail
naming it, and is replaced: SIGTERM (a child that can still drain releases what it holds), SIGKILL
once the drain deadline has passed, then started again like a crashed one.

A child that exits with :attr:`SupervisorConfig.give_up_status` (``run --drain``'s 5: a dependency
stayed unreachable past the bound) gave up for a reason restarting cannot fix: it is not started
again, and the run ends with that status once every child has ended, with the child's reason (its
last ``error:`` line, which the supervisor reads as it passes the child's stderr on). Without it, a
long-running supervisor restarts every child that exits non-zero, with backoff: a pod's job is to
keep trying.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from worker.domain.plural import counted
from worker.service.cpus import usable_cpus

log = logging.getLogger(__name__)

#: How often the children's probes are polled.
POLL_SECONDS = 1.0
#: A child that has run this long without crashing starts its next backoff from the beginning.
STABLE_SECONDS = 60.0


def process_count(text: str) -> int:
    """``auto`` (the cores this process may use: affinity capped by the cgroup CPU quota) or 1 to 64."""
    if text.strip().lower() == "auto":
        return usable_cpus()
    count = int(text)
    if not 1 <= count <= 64:
        raise ValueError(f"{text}: use a whole number from 1 to 64, or auto")
    return count


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(slots=True)
class Child:
    """One pump process and what the supervisor knows of it."""

    index: int
    health_port: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    #: (live, ready, detail) from the child's last probe.
    probe: tuple[bool, bool, str] = (True, False, "starting")
    #: When (monotonic) the child last answered a probe, or was started.
    answered: float = 0.0
    #: When (monotonic) a wedged child being replaced is killed if it has not exited; 0 when not.
    kill_at: float = 0.0
    #: Times this child was replaced for being wedged.
    replacements: int = 0
    #: A replaced child that exited and is to be started again, whatever its exit status.
    restart_now: bool = False
    #: The last ``ab-worker ...: error: ...`` line the child wrote to stderr (what it ended on).
    last_error: str = ""
    #: Exited with the give-up status: ended for good, not restarted.
    gave_up: bool = False
    #: Passes the child's stderr on, noting its error lines.
    stderr_reader: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """How to start the children and how patient to be with them."""

    processes: int
    command: Sequence[str]
    env: Mapping[str, str]
    drain_deadline: float = 25.0
    min_backoff: float = 1.0
    max_backoff: float = 30.0
    #: A child that has not answered its probe for this long (or says it is not live) is wedged and
    #: replaced; the worker's own ``AB_WORKER_LIVENESS_TIMEOUT``.
    liveness_timeout: float = 120.0
    #: Child ``i`` (1-based) gets these extra environment variables and arguments, e.g. its own rows file.
    child_env: Callable[[int], Mapping[str, str]] = lambda index: {}
    child_args: Callable[[int], Sequence[str]] = lambda index: ()
    #: A child that exits with this status gave up (``run --drain``: a dependency stayed unreachable):
    #: it is not restarted, and the run ends with this status. None: every failed child is restarted.
    give_up_status: int | None = None


class Supervisor:
    """Starts, watches, restarts and drains the pump processes."""

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.children = [Child(i, free_port()) for i in range(1, config.processes + 1)]
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._next_poll = 0.0
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every child to drain; safe from a signal handler."""
        self._stop.set()

    def run(self) -> int:
        """Supervise until stopped or until every child has ended by itself (exit 0, or gave up); the exit status.

        The give-up status when a child gave up (see :meth:`gave_up`), 1 when a child's last exit
        was another failure, else 0.
        """
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                self._start_due()
                self._kill_overdue()
                self._reap()
                if all(self._finished(child) for child in self.children):
                    break
                if time.monotonic() >= self._next_poll:
                    self._poll_probes()
                    self._next_poll = time.monotonic() + POLL_SECONDS
                self._stop.wait(POLL_SECONDS / 4)
        finally:
            self._drain()
        if self.config.give_up_status is not None and self.gave_up():
            return self.config.give_up_status
        failed = [c.index for c in self.children if c.exit_codes and c.exit_codes[-1] not in (0, -signal.SIGTERM)]
        return 1 if failed else 0

    def gave_up(self) -> list[tuple[int, str]]:
        """(index, reason) of every child that gave up, the reason being its last error line (without the prefix)."""
        return [(c.index, c.last_error or f"exited with status {c.exit_codes[-1]}") for c in self.children if c.gave_up]

    def health(self) -> tuple[bool, bool, str]:
        """(live, ready, detail) over every child, for /healthz and /readyz."""
        live = time.monotonic() - self._heartbeat < max(30.0, 10 * POLL_SECONDS)
        if self._stop.is_set():
            return live, False, "draining"
        details, ready = [], True
        with self._lock:
            for child in self.children:
                child_live, child_ready, detail = child.probe
                if child.running and not child_live:
                    live = False
                if not (child.running and child_ready):
                    ready = False
                    details.append(f"process {child.index}: {detail}")
        return live, ready, "; ".join(details) or f"ok ({counted(len(self.children), 'process', 'processes')})"

    # -- children ----------------------------------------------------------------------------

    def _finished(self, child: Child) -> bool:
        ended = child.gave_up or (bool(child.exit_codes) and child.exit_codes[-1] == 0)
        return not child.running and not child.restart_now and ended

    def _start_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None and now >= child.next_start and not self._finished(child):
                self._start(child)

    def _start(self, child: Child) -> None:
        env = {
            **self.config.env,
            **self.config.child_env(child.index),
            "AB_WORKER_HEALTH_PORT": str(child.health_port),
            "AB_WORKER_HEALTH_HOST": "127.0.0.1",
        }
        command = [*self.config.command, *self.config.child_args(child.index)]
        child.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)  # noqa: S603 - our own entry point
        child.last_error = ""
        child.stderr_reader = threading.Thread(
            target=_pass_on, args=(child, child.process.stderr), name=f"stderr-{child.index}", daemon=True
        )
        child.stderr_reader.start()
        child.started = child.answered = time.monotonic()
        child.kill_at, child.restart_now = 0.0, False
        with self._lock:
            child.probe = (True, False, "starting")
        log.info("process %d started (pid %d)", child.index, child.process.pid)

    def _reap(self) -> None:
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            child.exit_codes.append(code)
            child.process = None
            replaced, child.kill_at = child.kill_at > 0, 0.0
            if replaced:
                # Wedged, stopped by us: started again at once, whatever it exited with.
                child.next_start, child.restart_now = time.monotonic(), True
                with self._lock:
                    child.probe = (True, False, f"replaced (was wedged); exited with {code}")
                log.warning("process %d (wedged) exited with %d; starting it again", child.index, code)
                continue
            if code == 0:
                log.info("process %d finished", child.index)
                continue
            if code == self.config.give_up_status:
                self._give_up(child, code)
                continue
            if time.monotonic() - child.started >= STABLE_SECONDS:
                child.restarts = 0
            delay = min(self.config.max_backoff, self.config.min_backoff * 2**child.restarts)
            child.restarts += 1
            child.next_start = time.monotonic() + delay
            with self._lock:
                child.probe = (True, False, f"exited with {code}; restarting in {delay:.0f} s")
            log.warning("process %d exited with %d; restarting in %.1f s", child.index, code, delay)

    def _give_up(self, child: Child, code: int) -> None:
        """The child gave up (a dependency stayed unreachable): it ends for good, with its reason."""
        if child.stderr_reader is not None:
            child.stderr_reader.join(5.0)  # its last line (the reason) may still be on its way
        child.gave_up = True
        reason = child.last_error or f"exited with status {code}"
        with self._lock:
            child.probe = (True, False, f"gave up: {reason}")
        log.error("process %d gave up (exit status %d), not restarted: %s", child.index, code, reason)

    def _poll_probes(self) -> None:
        for child in self.children:
            if not child.running or child.kill_at:
                continue
            probe = _probe(child.health_port)
            now = time.monotonic()
            if probe is not None:
                child.answered = now
                with self._lock:
                    child.probe = probe
                if not probe[0]:
                    self._replace(child, f"its own /healthz fails ({probe[2]})")
            elif now - child.answered >= self.config.liveness_timeout:
                self._replace(child, f"has not answered its probe for {now - child.answered:.0f} s")

    def _replace(self, child: Child, why: str) -> None:
        """A wedged child: /healthz fails naming it until it is gone; SIGTERM now, SIGKILL at the drain deadline."""
        assert child.process is not None
        detail = f"wedged: {why}; replacing it"
        with self._lock:
            child.probe = (False, False, detail)
        log.error("process %d (pid %d) %s", child.index, child.process.pid, detail)
        child.replacements += 1
        child.kill_at = time.monotonic() + self.config.drain_deadline
        child.process.send_signal(signal.SIGTERM)

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.kill_at and now >= child.kill_at and child.running:
                assert child.process is not None
                log.error("process %d did not stop within the drain deadline; killing it", child.index)
                child.process.kill()

    def _drain(self) -> None:
        running = [c for c in self.children if c.running]
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_deadline
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("process %d did not stop within the drain deadline; killing it", child.index)
                child.process.kill()
                child.process.wait()
            child.exit_codes.append(child.process.returncode)
            child.process = None


def _pass_on(child: Child, stream: IO[bytes] | None) -> None:
    """Copy the child's stderr to ours line by line, remembering its last ``error:`` line (the reason it ended)."""
    if stream is None:
        return
    out = getattr(sys.stderr, "buffer", None)
    with stream:
        for line in stream:
            text = line.decode("utf-8", "replace").rstrip("\n")
            prefix, marker, reason = text.partition(": error: ")
            if marker and prefix.startswith("ab-worker "):
                child.last_error = reason
            try:
                if out is not None:
                    out.write(line)
                    out.flush()
                else:  # a host (a test runner) put a text stream there
                    print(text, file=sys.stderr, flush=True)
            except (OSError, ValueError):  # our stderr is gone: keep draining, so the child never blocks
                pass


def _probe(port: int) -> tuple[bool, bool, str] | None:
    """The child's (live, ready, detail), or None when it does not answer (in time)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=POLL_SECONDS) as answer:
            return True, True, str(json.load(answer).get("detail", "ok"))
    except urllib.error.HTTPError as refused:
        detail = _detail(refused, "unavailable")
    except (OSError, ValueError):
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=POLL_SECONDS):
            return True, False, detail
    except urllib.error.HTTPError:
        return False, False, detail
    except (OSError, ValueError):
        return None


def _detail(answer: urllib.error.HTTPError, default: str) -> str:
    try:
        return str(json.load(answer).get("detail", default))
    except (OSError, ValueError, AttributeError):
        return default
