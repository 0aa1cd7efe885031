"""In-memory fakes of every port. They record what happened, for unit tests of the pump.

They are fakes, not stand-ins: nothing here exercises an Azure SDK. Integration tests run the real
SDKs against the local stand-ins instead.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.models import AssignmentRecord
from worker.domain.errors import TransientError
from worker.service.ports import Delivery, OutboundEvent, SettlementLostError, complete_each


@dataclass(slots=True)
class DeadLetter:
    """A dead-lettered message as the fake broker keeps it."""

    delivery: Delivery
    reason: str
    description: str


@dataclass
class MemorySource:
    """A queue of deliveries with peek-lock semantics: abandon puts a message back, counted."""

    max_delivery_count: int = 10
    queue: deque[Delivery] = field(default_factory=deque)
    completed: list[Delivery] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    abandoned: list[Delivery] = field(default_factory=list)
    lost_locks: set[str] = field(default_factory=set)
    closed: bool = False
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(
        self,
        body: bytes | str,
        message_id: str | None = None,
        application_properties: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> Delivery:
        """Enqueue a request as a publisher would."""
        delivery = Delivery(
            body=body.encode() if isinstance(body, str) else body,
            message_id=message_id or f"msg-{next(self._ids)}",
            application_properties=dict(application_properties or {}),
            enqueued_time=fields.pop("enqueued_time", datetime(2026, 1, 1, tzinfo=UTC)),
            **fields,
        )
        with self._lock:
            self.queue.append(delivery)
        return delivery

    def receive(self, max_messages: int, max_wait: float) -> Sequence[Delivery]:
        """Pop up to ``max_messages`` immediately (the fake never blocks)."""
        batch: list[Delivery] = []
        with self._lock:
            while self.queue and len(batch) < max_messages:
                delivery = self.queue.popleft()
                delivery.delivery_count += 1
                batch.append(delivery)
        return batch

    def _check_lock(self, delivery: Delivery) -> None:
        if delivery.message_id in self.lost_locks:
            self.lost_locks.discard(delivery.message_id)
            self.queue.append(delivery)
            raise SettlementLostError(f"lock lost for {delivery.message_id}")

    def complete(self, delivery: Delivery) -> None:
        """Record the completion."""
        self._check_lock(delivery)
        self.completed.append(delivery)

    def complete_batch(self, deliveries: Sequence[Delivery]) -> dict[int, SettlementLostError]:
        """Complete each in turn."""
        return complete_each(self, deliveries)

    def dead_letter(self, delivery: Delivery, reason: str, description: str) -> None:
        """Record the dead-letter with its reason."""
        self._check_lock(delivery)
        self.dead_letters.append(DeadLetter(delivery, reason, description))

    def abandon(self, delivery: Delivery) -> None:
        """Requeue, or dead-letter as MaxDeliveryCountExceeded past the limit, as Service Bus does."""
        self._check_lock(delivery)
        self.abandoned.append(delivery)
        if delivery.delivery_count >= self.max_delivery_count:
            self.dead_letters.append(DeadLetter(delivery, "MaxDeliveryCountExceeded", "delivery count exceeded"))
        else:
            self.queue.append(delivery)

    def close(self) -> None:
        """Mark closed."""
        self.closed = True


@dataclass
class MemoryPublisher:
    """Records published events; ``fail`` makes the next publishes raise a transient error."""

    published: list[OutboundEvent] = field(default_factory=list)
    failures_left: int = 0
    fail: Callable[[Sequence[OutboundEvent]], bool] | None = None
    closed: bool = False

    def publish(self, events: Sequence[OutboundEvent]) -> None:
        """Record the events, or fail as configured."""
        if self.failures_left > 0 or (self.fail is not None and self.fail(events)):
            self.failures_left = max(0, self.failures_left - 1)
            raise TransientError("event topic unavailable (fake)")
        self.published.extend(events)

    def close(self) -> None:
        """Mark closed."""
        self.closed = True


@dataclass
class MemorySink:
    """Buffers rows and keeps flushed ones; ``failures_left`` makes flushes fail."""

    max_rows: int = 500
    buffer: list[AssignmentRecord] = field(default_factory=list)
    rows: list[AssignmentRecord] = field(default_factory=list)
    flushes: int = 0
    failures_left: int = 0
    closed: bool = False

    def add(self, records: Sequence[AssignmentRecord]) -> None:
        """Buffer rows."""
        self.buffer.extend(records)

    def due(self) -> bool:
        """Due by size only (the fake has no clock)."""
        return len(self.buffer) >= self.max_rows

    def flush(self) -> None:
        """Keep the buffered rows, or drop them and raise when told to fail."""
        buffered, self.buffer = self.buffer, []
        if self.failures_left > 0:
            self.failures_left -= 1
            raise TransientError("Kusto unavailable (fake)")
        self.rows.extend(buffered)
        self.flushes += 1

    def close(self) -> None:
        """Flush and mark closed."""
        if self.buffer:
            self.flush()
        self.closed = True
