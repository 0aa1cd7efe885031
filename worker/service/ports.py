"""The ports: small Protocols the pump talks to. Adapters implement them; fakes need no base class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from schemas.models import AssignmentRecord
from worker.domain.errors import PermanentError
from worker.domain.registry import ExperimentRegistry


@dataclass(slots=True)
class Delivery:
    """One received request message, whatever the source.

    ``handle`` is the adapter's own object (the SDK's received message, a file's line number): the
    service never looks inside it, so it is an ``object`` here and the adapter that made it names its type.
    """

    body: bytes
    message_id: str
    correlation_id: str | None = None
    content_type: str | None = None
    application_properties: Mapping[str, object] = field(default_factory=dict)
    enqueued_time: datetime | None = None
    delivery_count: int = 0
    reply_to: str | None = None
    reply_to_session_id: str | None = None
    handle: object = None
    #: Set by a source that could not read the message (its body, ids or reply address): the error
    #: that dead-letters it. Conversion never raises, so one unreadable message fails alone.
    unreadable: PermanentError | None = None


@dataclass(frozen=True, slots=True)
class OutboundEvent:
    """An assignment event ready to publish: JSON body plus broker properties."""

    body: bytes
    message_id: str
    correlation_id: str
    application_properties: Mapping[str, str]
    reply_to: str | None = None
    reply_to_session_id: str | None = None
    content_type: str = "application/json"


class SettlementLostError(Exception):
    """Settling failed because the lock was lost or the message was already settled.

    Expected under redelivery: the pump logs and counts it, then moves on.
    """


class ExperimentSource(Protocol):
    """Where the experiments come from: the registry in force now, asked for once per batch.

    One call, so any source fits: the experiments file reloaded on change
    (``adapters.experiments.ReloadingRegistry``), App Configuration, or ``lambda: registry`` in a test.
    A source keeps serving its last good registry when a new configuration is broken.
    """

    def __call__(self) -> ExperimentRegistry:
        """The current registry."""
        ...


class MessageSource(Protocol):
    """Where requests come from, and how they are settled."""

    def receive(self, max_messages: int, max_wait: float) -> Sequence[Delivery]:
        """Up to ``max_messages``, waiting at most ``max_wait`` seconds for the first."""
        ...

    def complete(self, delivery: Delivery) -> None:
        """Remove the message: it was processed and its outputs were accepted."""
        ...

    def complete_batch(self, deliveries: Sequence[Delivery]) -> Sequence[Delivery]:
        """Complete many; returns the deliveries whose settlement was lost (lock lost, already settled)."""
        ...

    def dead_letter(self, delivery: Delivery, reason: str, description: str) -> None:
        """Move the message to the dead-letter queue with a reason and description."""
        ...

    def abandon(self, delivery: Delivery) -> None:
        """Release the message for redelivery (a dependency failed)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class EventPublisher(Protocol):
    """Where assignment events go."""

    def publish(self, events: Sequence[OutboundEvent]) -> None:
        """Publish every event, or raise.

        ``TransientError``: not accepted, or not known to be (the whole call is retried later).
        ``PublishRejected``: the events it names were refused for good; every other one was accepted.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class RecordSink(Protocol):
    """Where Kusto rows go: durable only once :meth:`flush` returns.

    The pump keeps the rows of every unsettled message itself and adds them again after a failed
    flush, so a sink never has to hold rows across a failure.
    """

    def add(self, records: Sequence[AssignmentRecord]) -> None:
        """Take rows for the next flush."""
        ...

    def due(self) -> bool:
        """True when the sink wants a flush now (by size or age)."""
        ...

    def due_in(self) -> float | None:
        """Seconds until the rows it holds are due by age (0: due now); None when it holds none or has no clock.

        The pump waits no longer than this for a receive, so settlement never lags a flush by a receive's wait.
        """
        ...

    def flush(self) -> None:
        """Make the rows added since the last flush durable, or raise ``TransientError`` (they are then dropped)."""
        ...

    def close(self) -> None:
        """Flush what is left and release connections."""
        ...
