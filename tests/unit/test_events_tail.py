"""Reading a topic subscription: when ``events tail --idle`` counts as idle, and when the demo stops reading back.

Fakes stand in for the SDK's receiver so that a slow link open and late events are exact, not timed.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from azure.servicebus.amqp import AmqpMessageBodyType

from adapters.servicebus import tail
from adapters.servicebus.tail import SubscriptionTail, read_events


class Clock:
    """A monotonic clock the fakes move forward."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def message(event_id: str) -> Any:
    """What the SDK hands over for one event (the attributes the tail reads)."""
    return SimpleNamespace(
        body=[json.dumps({"event_id": event_id, "experiment_id": "exp_001"}).encode()],
        body_type=AmqpMessageBodyType.DATA,
        message_id=event_id,
        correlation_id=None,
        enqueued_time_utc=None,
        application_properties={},
    )


class Receiver:
    """A subscription receiver: opening it, and each receive, take the time the fakes say."""

    def __init__(self, batches: list[list[Any]], clock: Clock | None = None, open_takes: float = 0.0) -> None:
        self.batches = batches
        self.clock = clock
        self.open_takes = open_takes
        self.calls = 0
        self.completed: list[Any] = []
        #: Set to let the receive calls after the first ones return their batches (see the demo test).
        self.deliver = threading.Event()

    def __enter__(self) -> Receiver:
        if self.clock is not None:
            self.clock.now += self.open_takes
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def receive_messages(self, max_message_count: int, max_wait_time: float) -> list[Any]:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += max_wait_time
            return self.batches.pop(0) if self.batches else []
        # Real time: the batch comes only once the test lets it, as a late event does.
        if not self.deliver.wait(max_wait_time) or not self.batches:
            return []
        return self.batches.pop(0)

    def complete_message(self, received: Any) -> None:
        self.completed.append(received)


class Client:
    """A ServiceBusClient that hands out one receiver."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def get_subscription_receiver(self, topic: str, subscription: str, **options: Any) -> Receiver:
        return self.receiver


def test_idle_is_counted_from_the_open_link_not_from_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A link that took 5 s to open, then one empty receive: --idle 1 keeps reading and gets the events."""
    clock = Clock()
    monkeypatch.setattr(tail, "time", clock)
    receiver = Receiver([[], [message("e1"), message("e2")]], clock, open_takes=5.0)

    events = list(read_events(Client(receiver), "assignment-events", "all", idle_seconds=1.0))  # type: ignore[arg-type]

    assert [e.message_id for e in events] == ["e1", "e2"]
    assert [m.message_id for m in receiver.completed] == ["e1", "e2"]


def test_idle_still_ends_a_quiet_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing arrives: the read ends once the open link has been quiet for --idle seconds."""
    clock = Clock()
    monkeypatch.setattr(tail, "time", clock)
    receiver = Receiver([], clock, open_takes=5.0)

    assert list(read_events(Client(receiver), "assignment-events", "all", idle_seconds=1.0)) == []  # type: ignore[arg-type]
    assert receiver.calls == 2  # 0.5 s each: quiet for 1 s


def test_the_demo_reads_back_every_event_however_late_it_comes() -> None:
    """stop(expect=n) waits for the n-th event (here held back until after stop was called), then stops."""
    late = [message(f"e{i}") for i in range(3)]
    receiver = Receiver([late])
    seen: list[bytes] = []
    reader = SubscriptionTail(Client(receiver), "assignment-events", "all", seen.append)  # type: ignore[arg-type]
    reader.start()
    stopping = threading.Thread(target=reader.stop, kwargs={"expect": 3, "timeout": 30.0})
    stopping.start()
    stopping.join(0.2)
    assert stopping.is_alive(), "stop() returned before the events it expects were read"
    receiver.deliver.set()
    stopping.join(30)
    assert not stopping.is_alive()
    assert reader.received == 3
    assert len(seen) == 3


def test_stop_without_expecting_anything_stops_at_once() -> None:
    """The plain stop (an interrupted demo) does not wait."""
    receiver = Receiver([])
    reader = SubscriptionTail(Client(receiver), "assignment-events", "all", lambda body: None)  # type: ignore[arg-type]
    reader.start()
    reader.stop()
    assert reader.received == 0
