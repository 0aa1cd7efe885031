"""What the pump reports about each step, behind one observer seam (dramatiq's middleware is the model).

The pump calls the hooks of a :class:`PumpObserver` and nothing else: spans, metrics, logs and the
:class:`PumpStats` counters all live here, so ``pump.py`` stays flow only. Every hook is a no-op on
the base class; an observer overrides what it needs. Hooks must not raise.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from worker.domain.errors import PermanentError
from worker.service.handling import Handled
from worker.service.ports import Delivery, OutboundEvent
from worker.service.tracing import extract_context

log = logging.getLogger("worker.service.pump")


class Disposition(StrEnum):
    """How a message was settled; also the span attribute value."""

    COMPLETE = "complete"
    DEAD_LETTER = "dead_letter"
    ABANDON = "abandon"
    #: The broker refused the settlement (lock lost, already settled): nothing to do, it comes back.
    LOCK_LOST = "lock_lost"


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do with one message, chosen by :func:`worker.service.pump.settlement_for`."""

    disposition: Disposition
    reason: str = ""
    description: str = ""


@dataclass(slots=True)
class PumpStats:
    """Counters of what the pump did, for the demo summary, the CLI and tests."""

    received: int = 0
    completed: int = 0
    abandoned: int = 0
    settlement_lost: int = 0
    receive_failures: int = 0
    downstream_retries: int = 0
    batches: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    #: Users in their experiment (``in_experiment``: the ones results and the SRM check count), by
    #: (experiment, variant).
    assignments: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Users served a variant outside their experiment (override, holdout, coverage…), by (experiment, reason).
    outside: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def settled(self) -> int:
        """Messages settled one way or another (completed, dead-lettered, abandoned or lock lost)."""
        return self.completed + sum(self.dead_letters.values()) + self.abandoned + self.settlement_lost


class PumpObserver:
    """The hooks the pump calls, in order of a message's life. Subclass and override what you need."""

    def on_received(self, deliveries: Sequence[Delivery]) -> None:
        """A batch arrived (before any of it is handled)."""

    def on_handled(self, delivery: Delivery, outcome: Handled | BaseException) -> None:
        """One message was decoded and assigned (``Handled``), or failed to be (the error)."""

    @contextmanager
    def publishing(self, messages: Sequence[OutboundEvent]) -> Iterator[None]:
        """Wraps one publish attempt of a batch's events; runs on the pump's publisher thread."""
        yield

    def on_settled(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        """The message was completed, dead-lettered or abandoned."""

    def on_lock_lost(self, delivery: Delivery, settlement: Settlement) -> None:
        """Settling was refused (lock lost, already settled); the broker will redeliver the message."""

    def on_backoff(self, dependency: str, error: BaseException, attempt: int) -> None:
        """``dependency`` failed (transiently); the pump holds what it has and waits before retrying."""

    def on_recovered(self, dependency: str) -> None:
        """``dependency`` works again after at least one :meth:`on_backoff`."""


class Observers(PumpObserver):
    """Several observers, called in order."""

    def __init__(self, observers: Sequence[PumpObserver]) -> None:
        self.observers = list(observers)

    def on_received(self, deliveries: Sequence[Delivery]) -> None:
        for observer in self.observers:
            observer.on_received(deliveries)

    def on_handled(self, delivery: Delivery, outcome: Handled | BaseException) -> None:
        for observer in self.observers:
            observer.on_handled(delivery, outcome)

    @contextmanager
    def publishing(self, messages: Sequence[OutboundEvent]) -> Iterator[None]:
        with ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer.publishing(messages))
            yield

    def on_settled(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        for observer in self.observers:
            observer.on_settled(delivery, settlement, handled)

    def on_lock_lost(self, delivery: Delivery, settlement: Settlement) -> None:
        for observer in self.observers:
            observer.on_lock_lost(delivery, settlement)

    def on_backoff(self, dependency: str, error: BaseException, attempt: int) -> None:
        for observer in self.observers:
            observer.on_backoff(dependency, error, attempt)

    def on_recovered(self, dependency: str) -> None:
        for observer in self.observers:
            observer.on_recovered(dependency)


class Counting(PumpObserver):
    """Fills a :class:`PumpStats`."""

    def __init__(self, stats: PumpStats | None = None) -> None:
        self.stats = stats or PumpStats()

    def on_received(self, deliveries: Sequence[Delivery]) -> None:
        self.stats.batches += 1
        self.stats.received += len(deliveries)

    def on_settled(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        if settlement.disposition is Disposition.COMPLETE and handled is not None:
            self.stats.completed += 1
            for event in handled.events:
                if event.in_experiment:
                    self.stats.assignments[(event.experiment_id, event.variant_id)] += 1
                else:
                    self.stats.outside[(event.experiment_id, event.reason)] += 1
        elif settlement.disposition is Disposition.DEAD_LETTER:
            self.stats.dead_letters[settlement.reason] += 1
        elif settlement.disposition is Disposition.ABANDON:
            self.stats.abandoned += 1

    def on_lock_lost(self, delivery: Delivery, settlement: Settlement) -> None:
        self.stats.settlement_lost += 1

    def on_backoff(self, dependency: str, error: BaseException, attempt: int) -> None:
        if dependency == "broker":
            self.stats.receive_failures += 1
        else:
            self.stats.downstream_retries += 1


@dataclass(frozen=True, slots=True)
class Outage:
    """A dependency that stayed down past an :class:`OutageLimit`: which one, for how long, its last error."""

    dependency: str
    seconds: float
    error: str


class OutageLimit(PumpObserver):
    """Stops the pump once a dependency has been failing for ``limit`` seconds without a success (``run --drain``).

    A long-running worker waits out any outage, holding what it has. A drain is a job that must end:
    a broker (or topic, or Kusto) it cannot reach ends it, and :attr:`outage` says why. The limit is
    checked at each failed attempt, counted from the first failure, and the pump is stopped there
    (its backoff wait is cut short), so the run ends at the end of the first attempt that fails after
    the limit; each attempt is bounded by the adapter's own timeouts.
    """

    def __init__(self, limit: float, stop: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._stop = stop
        self._clock = clock
        self._failing_since: dict[str, float] = {}
        #: Set when the limit stopped the pump.
        self.outage: Outage | None = None

    def on_backoff(self, dependency: str, error: BaseException, attempt: int) -> None:
        now = self._clock()
        since = self._failing_since.setdefault(dependency, now)
        if self.outage is None and now - since >= self.limit:
            self.outage = Outage(dependency, now - since, str(error))
            self._stop()

    def on_recovered(self, dependency: str) -> None:
        self._failing_since.pop(dependency, None)


class Logging(PumpObserver):
    """The pump's log lines: outages once when they start and when they end, lost locks, handler bugs,
    and one INFO line per dead-lettered request (reason, message id, experiment).

    Dead-letter lines are rate-limited (a burst of ``burst``, then ``per_second``): a flood of poison
    must not flood the log. The next line written says how many were left out meanwhile; every dead
    letter is still counted in the metrics and the run summary.
    """

    def __init__(self, per_second: float = 5.0, burst: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self._dead_letter_lines = _TokenBucket(per_second, burst, clock)
        self._left_out = 0

    def on_settled(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        if settlement.disposition is not Disposition.DEAD_LETTER:
            return
        if not self._dead_letter_lines.take():
            self._left_out += 1
            return
        left_out, self._left_out = self._left_out, 0
        log.info(
            "Dead-lettered %s: message %s, experiment %s%s",
            settlement.reason,
            delivery.message_id,
            _experiment_of(delivery.body),
            f" ({left_out} more dead-lettered since the last such line, not logged)" if left_out else "",
        )

    def on_handled(self, delivery: Delivery, outcome: Handled | BaseException) -> None:
        if isinstance(outcome, BaseException) and not isinstance(outcome, PermanentError):
            # A bug, not bad input: the message is abandoned, so the broker's max delivery count bounds it.
            log.error("Unexpected error handling message %s", delivery.message_id, exc_info=outcome)

    def on_lock_lost(self, delivery: Delivery, settlement: Settlement) -> None:
        log.info("Message %s was not settled (%s); it will be redelivered", delivery.message_id, settlement.description)

    def on_backoff(self, dependency: str, error: BaseException, attempt: int) -> None:
        if attempt == 0:
            log.warning("%s unavailable; pausing and retrying with backoff: %s", dependency, error)

    def on_recovered(self, dependency: str) -> None:
        log.warning("%s is back; resuming", dependency)


class _TokenBucket:
    """``take()`` is true at most ``burst`` times at once and ``per_second`` times a second after that."""

    def __init__(self, per_second: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = per_second, float(burst), clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _experiment_of(body: bytes) -> str:
    """The request's ``experiment_id`` for a log line, escaped and bounded; ``-`` when it has none."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return "-"
    experiment = value.get("experiment_id") if isinstance(value, dict) else None
    return repr(experiment[:64]) if isinstance(experiment, str) else "-"


class Telemetry(PumpObserver):
    """OpenTelemetry spans (one CONSUMER span per message, one PRODUCER span per publish) and metrics."""

    def __init__(
        self,
        queue_name: str,
        topic_name: str,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.queue_name = queue_name
        self.topic_name = topic_name
        self._tracer = trace.get_tracer("ab_assignment_worker", tracer_provider=tracer_provider)
        meter = metrics.get_meter("ab_assignment_worker", meter_provider=meter_provider)
        self._assignments = meter.create_counter(
            "ab.assignments", description="Assignments by experiment, variant and reason (bucketed: in the experiment)"
        )
        self._dead_letters = meter.create_counter("ab.dead_letters", description="Dead-lettered requests by reason")
        self._abandoned = meter.create_counter("ab.abandoned", description="Requests released for redelivery")
        self._settlement_lost = meter.create_counter(
            "ab.lock_lost", description="Settlements refused: lock lost or already settled"
        )
        self._latency = meter.create_histogram(
            "ab.processing.duration", unit="s", description="Receive to settlement, per request"
        )
        self._batch_size = meter.create_histogram("ab.batch.size", description="Messages per received batch")
        #: Open spans by delivery (a Delivery is not hashable; each lives until it is settled).
        self._open: dict[int, tuple[Span, float]] = {}

    def on_received(self, deliveries: Sequence[Delivery]) -> None:
        self._batch_size.record(len(deliveries))
        for delivery in deliveries:
            self._open[id(delivery)] = (self._start(delivery), time.perf_counter())

    def _start(self, delivery: Delivery) -> Span:
        parent = extract_context(delivery.application_properties)
        span = self._tracer.start_span(f"{self.queue_name} process", context=parent, kind=SpanKind.CONSUMER)
        if span.is_recording():
            span.set_attribute("messaging.system", "servicebus")
            span.set_attribute("messaging.destination.name", self.queue_name)
            span.set_attribute("messaging.operation.type", "process")
            span.set_attribute("messaging.message.id", delivery.message_id)
            span.set_attribute("messaging.servicebus.message.delivery_count", delivery.delivery_count)
            # The Azure Monitor exporter drops messaging.* attributes from custom dimensions, so the
            # values operators query for are repeated under ab.* keys.
            span.set_attribute("ab.delivery_count", delivery.delivery_count)
        return span

    @contextmanager
    def publishing(self, messages: Sequence[OutboundEvent]) -> Iterator[None]:
        with self._tracer.start_as_current_span(f"{self.topic_name} publish", kind=SpanKind.PRODUCER) as span:
            if span.is_recording():
                span.set_attribute("messaging.system", "servicebus")
                span.set_attribute("messaging.destination.name", self.topic_name)
                span.set_attribute("messaging.operation.type", "publish")
                span.set_attribute("messaging.batch.message_count", len(messages))
            yield

    def on_lock_lost(self, delivery: Delivery, settlement: Settlement) -> None:
        self._settlement_lost.add(1)
        opened = self._open.pop(id(delivery), None)
        if opened is not None:
            span = opened[0]
            span.set_attribute("messaging.servicebus.disposition_status", "lock_lost")
            span.end()

    def on_settled(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        opened = self._open.pop(id(delivery), None)
        if opened is None:
            return
        span, started = opened
        self._count(settlement, handled, started)
        if span.is_recording():
            span.set_attribute("messaging.servicebus.disposition_status", settlement.disposition.value)
            span.set_attribute("ab.disposition", settlement.disposition.value)
            if handled is not None and len(handled.events) == 1:
                (event,) = handled.events
                span.set_attribute("feature_flag.key", event.experiment_id)
                span.set_attribute("feature_flag.result.variant", event.variant_id)
                span.set_attribute("feature_flag.provider.name", "ab-assignment-worker")
                # Why this variant, and whether the user counts: what tells a held-out or not-yet-ramped
                # user from a bucketed one in App Insights (never a context value: those stay inside).
                span.set_attribute("ab.reason", event.reason)
                span.set_attribute("ab.in_experiment", event.in_experiment)
                span.set_attribute("ab.config_version", event.config_version)
            elif handled is not None:
                span.set_attribute("ab.cohort.member_count", len(handled.events))
            if settlement.disposition is Disposition.DEAD_LETTER:
                span.set_attribute("messaging.servicebus.dead_letter_reason", settlement.reason)
                span.set_attribute("ab.dead_letter_reason", settlement.reason)
                span.set_status(Status(StatusCode.ERROR, settlement.reason))
        span.end()

    def _count(self, settlement: Settlement, handled: Handled | None, started: float) -> None:
        self._latency.record(time.perf_counter() - started)
        if settlement.disposition is Disposition.COMPLETE and handled is not None:
            for event in handled.events:
                self._assignments.add(
                    1,
                    {"experiment_id": event.experiment_id, "variant_id": event.variant_id, "reason": event.reason},
                )
        elif settlement.disposition is Disposition.DEAD_LETTER:
            self._dead_letters.add(1, {"reason": settlement.reason})
        elif settlement.disposition is Disposition.ABANDON:
            self._abandoned.add(1)
