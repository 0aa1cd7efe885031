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
from typing import TypedDict, Unpack

from adapters.settlement import complete_each
from schemas.models import AssignmentRecord
from worker.domain.errors import PermanentError, PublishRejected, TransientError
from worker.service.ports import Delivery, OutboundEvent, SettlementLostError


class DeliveryFields(TypedDict, total=False):
    """The :class:`Delivery` fields a test may set on a message it sends to :class:`MemorySource`."""

    correlation_id: str | None
    content_type: str | None
    enqueued_time: datetime | None
    delivery_count: int
    reply_to: str | None
    reply_to_session_id: str | None
    handle: object
    unreadable: PermanentError | None


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
        application_properties: Mapping[str, object] | None = None,
        **fields: Unpack[DeliveryFields],
    ) -> Delivery:
        """Enqueue a request as a publisher would."""
        given: DeliveryFields = {"enqueued_time": datetime(2026, 1, 1, tzinfo=UTC), **fields}
        delivery = Delivery(
            body=body.encode() if isinstance(body, str) else body,
            message_id=message_id or f"msg-{next(self._ids)}",
            application_properties=dict(application_properties or {}),
            **given,
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

    def complete_batch(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Complete each in turn."""
        return complete_each(self.complete, deliveries)

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
    """Records published events.

    ``failures_left`` / ``fail`` make publishes raise a transient error (nothing accepted);
    ``reject`` names events to refuse for good: ``{message_id: PermanentError}``. A publish holding
    any of them accepts the others and raises ``PublishRejected``, as a real publisher must.
    ``reject_reply`` names events the topic accepts (they are in ``published``) but whose reply is
    refused for good, as a missing ``reply_to`` queue is: ``PublishRejected.reached_topic`` names them.
    """

    published: list[OutboundEvent] = field(default_factory=list)
    failures_left: int = 0
    fail: Callable[[Sequence[OutboundEvent]], bool] | None = None
    reject: dict[str, PermanentError] = field(default_factory=dict)
    reject_reply: dict[str, PermanentError] = field(default_factory=dict)
    rejected: list[OutboundEvent] = field(default_factory=list)
    calls: int = 0
    closed: bool = False

    def publish(self, events: Sequence[OutboundEvent]) -> None:
        """Record the events, or fail as configured."""
        self.calls += 1
        if self.failures_left > 0 or (self.fail is not None and self.fail(events)):
            self.failures_left = max(0, self.failures_left - 1)
            raise TransientError("event topic unavailable (fake)")
        refused = {e.message_id: self.reject[e.message_id] for e in events if e.message_id in self.reject}
        reply_refused = {
            e.message_id: self.reject_reply[e.message_id]
            for e in events
            if e.message_id in self.reject_reply and e.message_id not in refused
        }
        self.published.extend(e for e in events if e.message_id not in refused)
        if refused or reply_refused:
            self.rejected.extend(e for e in events if e.message_id in refused or e.message_id in reply_refused)
            raise PublishRejected({**refused, **reply_refused}, reached_topic=reply_refused)

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

    def due_in(self) -> float | None:
        """0 when due by size; otherwise None (no age)."""
        return 0.0 if self.due() else None

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
