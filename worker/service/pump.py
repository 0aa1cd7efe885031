"""The message pump: receive a batch → handle each message → publish → record → settle.

Settlement comes last. A message is completed only after its event was published and its row was
flushed; a crash anywhere before that means redelivery, never loss. A bad message is dead-lettered
on its own and never fails or delays the rest of its batch. During a downstream failure the
affected messages are held (their locks renewed) and retried with backoff while receiving pauses, so an
outage burns no delivery counts; nothing is dead-lettered for it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from schemas.models import MAX_COHORT_MEMBERS, AssignmentEvent, AssignmentRecord
from worker.domain.errors import PermanentError, TransientError
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import DEFAULT_MAX_BODY_BYTES, Handled, handle
from worker.service.ports import Delivery, EventPublisher, MessageSource, OutboundEvent, RecordSink, SettlementLostError
from worker.service.tracing import extract_context

log = logging.getLogger(__name__)


class Disposition(StrEnum):
    """How a message was settled; also the span attribute value."""

    COMPLETE = "complete"
    DEAD_LETTER = "dead_letter"
    ABANDON = "abandon"


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do with one message, chosen by :func:`settlement_for`."""

    disposition: Disposition
    reason: str = ""
    description: str = ""


def settlement_for(outcome: Handled | AssignmentEvent | BaseException) -> Settlement:
    """The one place that maps an outcome to a settlement."""
    if isinstance(outcome, Handled | AssignmentEvent):
        return Settlement(Disposition.COMPLETE)
    if isinstance(outcome, PermanentError):
        return Settlement(Disposition.DEAD_LETTER, outcome.reason.value, outcome.description)
    return Settlement(Disposition.ABANDON)


@dataclass(slots=True)
class PumpConfig:
    """Tuning of the pump; the settings object fills it in at the entry point."""

    queue_name: str = "assignment-requests"
    topic_name: str = "assignment-events"
    max_batch: int = 100
    max_wait: float = 1.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    context_allow_list: Collection[str] = ()
    max_cohort_members: int = MAX_COHORT_MEMBERS
    drain_deadline: float = 25.0
    min_backoff: float = 0.5
    max_backoff: float = 30.0
    #: /healthz fails when the loop has not turned for this long (a wedged process).
    liveness_timeout: float = 120.0


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
    assignments: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass(slots=True)
class _InFlight:
    delivery: Delivery
    span: Span
    started: float
    handled: Handled | None = None


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.assignments = meter.create_counter("ab.assignments", description="Assignments by experiment and variant")
        self.dead_letters = meter.create_counter("ab.dead_letters", description="Dead-lettered requests by reason")
        self.abandoned = meter.create_counter("ab.abandoned", description="Requests released for redelivery")
        self.settlement_lost = meter.create_counter(
            "ab.lock_lost", description="Settlements refused: lock lost or already settled"
        )
        self.latency = meter.create_histogram(
            "ab.processing.duration", unit="s", description="Receive to settlement, per request"
        )
        self.batch_size = meter.create_histogram("ab.batch.size", description="Messages per received batch")


class Pump:
    """Drives a :class:`MessageSource` through handling into an :class:`EventPublisher` and :class:`RecordSink`."""

    def __init__(
        self,
        source: MessageSource,
        publisher: EventPublisher,
        sink: RecordSink,
        registry: Callable[[], ExperimentRegistry],
        *,
        config: PumpConfig | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.source = source
        self.publisher = publisher
        self.sink = sink
        self.registry = registry
        self.config = config or PumpConfig()
        self.stats = PumpStats()
        self._tracer = trace.get_tracer("ab_assignment_worker", tracer_provider=tracer_provider)
        self._instruments = _Instruments(metrics.get_meter("ab_assignment_worker", meter_provider=meter_provider))
        self._pending: list[_InFlight] = []
        #: The rows of ``_pending``, kept to buffer again if a flush fails.
        self._pending_records: list[AssignmentRecord] = []
        self._stop = threading.Event()
        self._receive_failures = 0
        self._down: dict[str, str] = {}
        self._heartbeat = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the pump to stop after the in-flight batch; safe from a signal handler."""
        self._stop.set()

    def run(self, idle_exit: float | None = None) -> PumpStats:
        """Process batches until stopped (or, with ``idle_exit``, until the source stays empty that long)."""
        idle_since: float | None = None
        try:
            while not self._stop.is_set():
                handled = self.run_once()
                if handled or self._down:
                    idle_since = None
                elif idle_exit is not None:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= idle_exit:
                        break
        finally:
            self.drain()
        return self.stats

    def drain(self) -> None:
        """Flush the sink and settle everything held, then close the ports."""
        self._stop.set()
        self._flush_and_settle()
        for port in (self.source, self.publisher, self.sink):
            try:
                port.close()
            except Exception:
                log.exception("Error while closing %s", type(port).__name__)

    # -- one batch ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Receive and handle one batch; returns how many messages it received or settled."""
        self._heartbeat = time.monotonic()
        deliveries = self._receive()
        if deliveries:
            self.stats.batches += 1
            self.stats.received += len(deliveries)
            self._instruments.batch_size.record(len(deliveries))
            self._handle_batch(deliveries)
        settled = 0
        if self._pending and (self.sink.due() or self._stop.is_set() or not deliveries):
            settled = len(self._pending)
            self._flush_and_settle()
        return len(deliveries) + settled

    def _receive(self) -> Sequence[Delivery]:
        try:
            deliveries = self.source.receive(self.config.max_batch, self.config.max_wait)
        except TransientError as exc:
            # The broker is unreachable: back off (waking early on stop) and try again; the source
            # rebuilds its link, so the worker resumes by itself when the broker returns.
            self.stats.receive_failures += 1
            self._unhealthy("broker", exc)
            self._backoff(self._receive_failures)
            self._receive_failures += 1
            return []
        self._receive_failures = 0
        self._healthy("broker")
        return deliveries

    def _backoff(self, attempt: int) -> None:
        delay = min(self.config.max_backoff, self.config.min_backoff * 2 ** min(attempt, 16))
        self._stop.wait(delay * (0.5 + random.random() / 2))

    def _retry_until_stopped(self, dependency: str, action: Callable[[], None]) -> bool:
        """Run ``action`` until it succeeds (True) or the pump is stopping (False).

        While a dependency is down the pump stops receiving and holds what it has: the locks are
        kept alive by the source, so no delivery count is burned and healthy requests are never
        dead-lettered as MaxDeliveryCountExceeded because of someone else's outage.
        """
        attempt = 0
        while True:
            try:
                action()
            except TransientError as exc:
                self._unhealthy(dependency, exc)
                if self._stop.is_set():
                    return False
                self.stats.downstream_retries += 1
                self._backoff(attempt)
                attempt += 1
                continue
            self._healthy(dependency)
            return True

    def _unhealthy(self, dependency: str, exc: BaseException) -> None:
        if dependency not in self._down:
            log.warning("%s unavailable; pausing and retrying with backoff: %s", dependency, exc)
        self._down[dependency] = str(exc)

    def _healthy(self, dependency: str) -> None:
        if self._down.pop(dependency, None) is not None:
            log.warning("%s is back; resuming", dependency)

    def health(self) -> tuple[bool, bool, str]:
        """(live, ready, detail) for the /healthz and /readyz probes."""
        live = time.monotonic() - self._heartbeat < self.config.liveness_timeout
        if self._stop.is_set():
            return live, False, "draining"
        if self._down:
            return live, False, "; ".join(f"{name} down: {why}" for name, why in sorted(self._down.items()))
        return live, True, "ok"

    def _handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        registry = self.registry()
        assigned: list[_InFlight] = []
        for delivery in deliveries:
            flight = self._start(delivery)
            try:
                flight.handled = handle(
                    delivery,
                    registry,
                    context_allow_list=self.config.context_allow_list,
                    max_body_bytes=self.config.max_body_bytes,
                    max_cohort_members=self.config.max_cohort_members,
                )
            except PermanentError as exc:
                self._settle(flight, settlement_for(exc))
                continue
            except Exception as exc:
                # A bug, not bad input: let the broker redeliver (and eventually dead-letter it as
                # MaxDeliveryCountExceeded) rather than stop the whole worker.
                log.exception("Unexpected error handling message %s", delivery.message_id)
                self._settle(flight, settlement_for(exc))
                continue
            assigned.append(flight)
        if not assigned:
            return
        events = [e for f in assigned if f.handled is not None for e in f.handled.events]
        # Serialised once: an outage retries the same messages instead of rebuilding them.
        messages = [m for f in assigned if f.handled is not None for m in f.handled.outbound(f.delivery)]
        if not self._retry_until_stopped("event topic", lambda: self._publish(messages)):
            # Shutting down mid-outage: release them for another replica rather than wait.
            for flight in assigned:
                self._settle(flight, Settlement(Disposition.ABANDON))
            return
        records = [AssignmentRecord.from_event(e) for e in events]
        self.sink.add(records)
        self._pending.extend(assigned)
        self._pending_records.extend(records)

    def _publish(self, messages: Sequence[OutboundEvent]) -> None:
        with self._tracer.start_as_current_span(f"{self.config.topic_name} publish", kind=SpanKind.PRODUCER) as span:
            if span.is_recording():
                span.set_attribute("messaging.system", "servicebus")
                span.set_attribute("messaging.destination.name", self.config.topic_name)
                span.set_attribute("messaging.operation.type", "publish")
                span.set_attribute("messaging.batch.message_count", len(messages))
            self.publisher.publish(messages)

    def _flush_and_settle(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        records, self._pending_records = self._pending_records, []
        first = True

        def flush() -> None:
            nonlocal first
            if not first:
                # A failed flush dropped its buffer (the RecordSink contract): buffer the rows again.
                self.sink.add(records)
            first = False
            self.sink.flush()

        if not self._retry_until_stopped("record sink", flush):
            for flight in pending:
                self._settle(flight, Settlement(Disposition.ABANDON))
            return
        self._complete_all(pending)

    # -- per message -------------------------------------------------------------------------

    def _start(self, delivery: Delivery) -> _InFlight:
        parent: Context | None = extract_context(delivery.application_properties)
        span = self._tracer.start_span(f"{self.config.queue_name} process", context=parent, kind=SpanKind.CONSUMER)
        if span.is_recording():
            span.set_attribute("messaging.system", "servicebus")
            span.set_attribute("messaging.destination.name", self.config.queue_name)
            span.set_attribute("messaging.operation.type", "process")
            span.set_attribute("messaging.message.id", delivery.message_id)
            span.set_attribute("messaging.servicebus.message.delivery_count", delivery.delivery_count)
            # The Azure Monitor exporter drops messaging.* attributes from custom dimensions, so the
            # values operators query for are repeated under ab.* keys.
            span.set_attribute("ab.delivery_count", delivery.delivery_count)
        return _InFlight(delivery, span, time.perf_counter())

    def _settle(self, flight: _InFlight, settlement: Settlement) -> None:
        delivery = flight.delivery
        try:
            if settlement.disposition is Disposition.COMPLETE:
                self.source.complete(delivery)
            elif settlement.disposition is Disposition.DEAD_LETTER:
                self.source.dead_letter(delivery, settlement.reason, settlement.description)
            else:
                self.source.abandon(delivery)
        except SettlementLostError as exc:
            self._settlement_lost(flight, exc)
            return
        self._settled(flight, settlement)

    def _complete_all(self, flights: Sequence[_InFlight]) -> None:
        """Complete many at once: the source may settle contiguous deliveries with one disposition."""
        lost = self.source.complete_batch([f.delivery for f in flights])
        for flight in flights:
            failure = lost.get(id(flight.delivery))
            if failure is not None:
                self._settlement_lost(flight, failure)
            elif flight.handled is not None:
                self._settled(flight, settlement_for(flight.handled))

    def _settlement_lost(self, flight: _InFlight, exc: Exception) -> None:
        self.stats.settlement_lost += 1
        self._instruments.settlement_lost.add(1)
        log.info("Message %s was not settled (%s); it will be redelivered", flight.delivery.message_id, exc)
        flight.span.set_attribute("messaging.servicebus.disposition_status", "lock_lost")
        flight.span.end()

    def _settled(self, flight: _InFlight, settlement: Settlement) -> None:
        span = flight.span
        self._count(flight, settlement)
        if span.is_recording():
            span.set_attribute("messaging.servicebus.disposition_status", settlement.disposition.value)
            span.set_attribute("ab.disposition", settlement.disposition.value)
            if flight.handled is not None and len(flight.handled.events) == 1:
                (event,) = flight.handled.events
                span.set_attribute("feature_flag.key", event.experiment_id)
                span.set_attribute("feature_flag.result.variant", event.variant_id)
                span.set_attribute("feature_flag.provider.name", "ab-assignment-worker")
            elif flight.handled is not None:
                span.set_attribute("ab.cohort.member_count", len(flight.handled.events))
            if settlement.disposition is Disposition.DEAD_LETTER:
                span.set_attribute("messaging.servicebus.dead_letter_reason", settlement.reason)
                span.set_attribute("ab.dead_letter_reason", settlement.reason)
                span.set_status(Status(StatusCode.ERROR, settlement.reason))
        span.end()

    def _count(self, flight: _InFlight, settlement: Settlement) -> None:
        self._instruments.latency.record(time.perf_counter() - flight.started)
        if settlement.disposition is Disposition.COMPLETE and flight.handled is not None:
            self.stats.completed += 1
            for event in flight.handled.events:
                self.stats.assignments[(event.experiment_id, event.variant_id)] += 1
                self._instruments.assignments.add(
                    1, {"experiment_id": event.experiment_id, "variant_id": event.variant_id}
                )
        elif settlement.disposition is Disposition.DEAD_LETTER:
            self.stats.dead_letters[settlement.reason] += 1
            self._instruments.dead_letters.add(1, {"reason": settlement.reason})
        else:
            self.stats.abandoned += 1
            self._instruments.abandoned.add(1)
