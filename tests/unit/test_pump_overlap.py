"""The pump publishes one batch on its publisher thread while it flushes and settles the ones before."""

from __future__ import annotations

import json
import threading

import pytest

from adapters.memory import MemoryPublisher, MemorySink, MemorySource
from worker.bootstrap import bootstrap
from worker.domain.errors import TransientError
from worker.domain.registry import ExperimentRegistry
from worker.service.pump import Pump, PumpConfig, settled

REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})


def _pump(source, publisher, sink=None, **config) -> Pump:
    return bootstrap(
        source=source,
        publisher=publisher,
        sink=sink or MemorySink(),
        registry=lambda: REGISTRY,
        config=PumpConfig(**config),
    )


def _fill(source: MemorySource, count: int) -> None:
    for i in range(count):
        source.send(json.dumps({"user_id": f"U{i}", "experiment_id": "exp_001"}), message_id=f"m{i}")


class _StepPublisher(MemoryPublisher):
    """Records its threads, fails if two publishes overlap, and says when a publish after the first began."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = threading.Lock()
        self.threads: set[threading.Thread] = set()
        self.next_started = threading.Event()

    def publish(self, events):
        assert self.busy.acquire(blocking=False), "two publishes at once"
        try:
            self.threads.add(threading.current_thread())
            if self.published:
                self.next_started.set()
            super().publish(events)
        finally:
            self.busy.release()


class _WatchedSource(MemorySource):
    """Counts receives begun during a publish; its first settlement waits (5 s at most) for the next publish."""

    publisher: _StepPublisher

    def __init__(self) -> None:
        super().__init__()
        self.receives_during_publish = 0
        self.settled_during_next_publish: bool | None = None

    def receive(self, max_messages, max_wait):
        if self.publisher.busy.locked():
            self.receives_during_publish += 1
        return super().receive(max_messages, max_wait)

    def complete_batch(self, deliveries):
        if self.settled_during_next_publish is None:
            self.settled_during_next_publish = self.publisher.next_started.wait(5)
        return super().complete_batch(deliveries)


def _stepped(count: int, **config) -> tuple[_WatchedSource, _StepPublisher, Pump]:
    source = _WatchedSource()
    publisher = source.publisher = _StepPublisher()
    _fill(source, count)
    return source, publisher, _pump(source, publisher, MemorySink(max_rows=2), max_batch=2, **config)


def test_the_previous_batch_is_settled_while_the_next_one_publishes():
    """Batch 1 is flushed and completed while batch 2's publish is in flight; every message completes once."""
    source, _, pump = _stepped(6)
    stats = pump.run(until=settled(6))
    assert source.settled_during_next_publish is True, "batch 1 was settled before batch 2 began publishing"
    assert sorted((d.message_id, d.delivery_count) for d in source.completed) == [(f"m{i}", 1) for i in range(6)]
    assert stats.completed == 6


def test_one_batch_publishes_at_a_time_on_one_thread_and_never_during_a_receive():
    """Publishes never overlap each other or a receive, and all (retries too) run on one publisher thread."""
    source, publisher, pump = _stepped(8, min_backoff=0.001)
    publisher.failures_left = 2
    pump.run(until=settled(8))
    assert source.receives_during_publish == 0
    (thread,) = publisher.threads
    assert thread is not threading.current_thread()
    assert not thread.is_alive(), "drain ends the publisher thread"


def test_with_rows_due_a_receive_still_waits_overlap_wait():
    """Rows due now cut a receive's wait to overlap_wait, not to nothing: the next batch may arrive meanwhile."""

    class Recording(MemorySource):
        def __init__(self) -> None:
            super().__init__()
            self.waits: list[float] = []

        def receive(self, max_messages, max_wait):
            self.waits.append(max_wait)
            return super().receive(max_messages, max_wait)

    source = Recording()
    _fill(source, 4)
    pump = _pump(source, MemoryPublisher(), MemorySink(max_rows=2), max_batch=2, max_wait=7.0, overlap_wait=0.25)
    pump.run(idle_exit=0)
    # Nothing held, then batch 1's rows due (batch 2 arrives), then batch 2's (the queue is empty), then nothing.
    assert source.waits == [7.0, 0.25, 0.25, 7.0]
    assert len(source.completed) == 4


def test_stopping_mid_sink_outage_tries_the_flush_once():
    """A flush fails and the pump stops: what was published meanwhile is abandoned without another flush."""

    class DownSink(MemorySink):
        attempts = 0

        def flush(self):
            self.attempts += 1
            self.buffer = []  # a failed flush drops the rows (the RecordSink contract)
            pump.stop()
            raise TransientError("Kusto unavailable (fake)")

    source, sink = MemorySource(), DownSink(max_rows=1)
    _fill(source, 4)
    pump = _pump(source, MemoryPublisher(), sink, max_batch=2, min_backoff=0.001)
    stats = pump.run()
    assert sink.attempts == 1
    assert stats.abandoned == 4
    assert (source.completed, source.dead_letters) == ([], [])


def test_a_bug_in_the_publisher_thread_is_raised_by_run():
    """An unexpected error on the publisher thread ends run() with it; its batch is not settled, ports are closed."""

    class BuggyPublisher(MemoryPublisher):
        thread: threading.Thread | None = None

        def publish(self, events):
            self.thread = threading.current_thread()
            raise RuntimeError("bug in the publisher")

    source, sink = MemorySource(), MemorySink()
    _fill(source, 4)
    publisher = BuggyPublisher()
    pump = _pump(source, publisher, sink, max_batch=2)
    with pytest.raises(RuntimeError, match="bug in the publisher"):
        pump.run()
    assert (source.completed, source.dead_letters, sink.rows) == ([], [], [])
    assert (source.closed, publisher.closed, sink.closed) == (True, True, True)
    assert publisher.thread is not None
    assert not publisher.thread.is_alive(), "the publisher thread is not left behind"
