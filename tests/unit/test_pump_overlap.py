"""The pump publishes one batch on its publisher thread while it receives and handles the next."""

from __future__ import annotations

import json
import threading

import pytest

from adapters.memory import MemoryPublisher, MemorySink, MemorySource
from worker.domain.errors import TransientError
from worker.domain.registry import ExperimentRegistry
from worker.service.bootstrap import bootstrap
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


class _RecordingSource(MemorySource):
    """Records each receive: the wait it was given and how many publishes had returned by then."""

    def __init__(self, publisher: _StepPublisher | None = None) -> None:
        super().__init__()
        self.publisher = publisher
        self.waits: list[float] = []
        self.published_before: list[int] = []
        self.received_again = threading.Event()

    def receive(self, max_messages, max_wait):
        self.waits.append(max_wait)
        self.published_before.append(self.publisher.returned if self.publisher else 0)
        batch = super().receive(max_messages, max_wait)
        if len(self.waits) == 2:
            self.received_again.set()
        return batch


class _StepPublisher(MemoryPublisher):
    """The first publish returns only once the pump asked for the next batch (or after 5 s, if it never does)."""

    def __init__(self) -> None:
        super().__init__()
        self.source: _RecordingSource | None = None
        self.overlapped: bool | None = None
        self.returned = 0
        self.threads: set[threading.Thread] = set()
        self._busy = threading.Lock()

    def publish(self, events):
        assert self._busy.acquire(blocking=False), "two publishes at once"
        try:
            self.threads.add(threading.current_thread())
            if self.overlapped is None:
                assert self.source is not None
                self.overlapped = self.source.received_again.wait(5)
            super().publish(events)
            self.returned += 1
        finally:
            self._busy.release()


def _stepped(count: int, **config) -> tuple[_RecordingSource, _StepPublisher, Pump]:
    publisher = _StepPublisher()
    source = _RecordingSource(publisher)
    publisher.source = source
    _fill(source, count)
    return source, publisher, _pump(source, publisher, **config)


def test_the_next_batch_is_received_while_the_previous_one_publishes():
    """Batch 2 is received while batch 1's publish is in flight; every message is still completed once."""
    source, publisher, pump = _stepped(6, max_batch=2)
    stats = pump.run(until=settled(6))
    assert publisher.overlapped is True, "the pump waited for the publish before receiving again"
    assert sorted(d.message_id for d in source.completed) == [f"m{i}" for i in range(6)]
    assert [(d.message_id, d.delivery_count) for d in source.completed if d.delivery_count != 1] == []
    assert stats.completed == 6


def test_at_most_one_batch_publishes_and_one_more_is_received_meanwhile():
    """Receive k+2 waits for publish k to return; publishes never overlap and all run on one publisher thread."""
    source, publisher, pump = _stepped(8, max_batch=2, min_backoff=0.001)
    publisher.failures_left = 2  # the retries of an outage run on the publisher thread too
    pump.run(until=settled(8))
    # published_before[k] is how many publishes had returned when receive k+1 began.
    assert all(done >= k - 1 for k, done in enumerate(source.published_before)), source.published_before
    (thread,) = publisher.threads
    assert thread is not threading.current_thread()
    assert not thread.is_alive(), "drain ends the publisher thread"


def test_a_receive_waits_overlap_wait_while_a_batch_publishes():
    """overlap_wait bounds the receive while a batch is publishing: a drained queue settles without waiting max_wait."""
    source, _, pump = _stepped(4, max_batch=2, max_wait=7.0, overlap_wait=0.25)
    pump.run(idle_exit=0)
    # Batch 1 publishes during receive 2, batch 2 during receive 3 (empty): then nothing publishes.
    assert source.waits == [7.0, 0.25, 0.25, 7.0]
    assert len(source.completed) == 4


def test_stopping_mid_outage_releases_the_batch_received_meanwhile_unsent():
    """The publish of batch 1 fails and the pump stops: batch 2, received meanwhile, is abandoned without a publish."""
    source = _RecordingSource()
    _fill(source, 4)

    def fail(events):
        assert source.received_again.wait(5)
        pump.stop()
        return True

    publisher = MemoryPublisher(fail=fail)
    pump = _pump(source, publisher, max_batch=2, min_backoff=0.001)
    stats = pump.run()
    assert publisher.calls == 1
    assert stats.abandoned == 4
    assert (source.completed, source.dead_letters) == ([], [])
    assert sorted(d.message_id for d in source.queue) == ["m0", "m1", "m2", "m3"]


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
