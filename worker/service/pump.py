"""The message pump: receive a batch → handle each message → publish → record → settle.

Settlement comes last. A message is completed only after its event was published and its row was
flushed; a crash anywhere before that means redelivery, never loss. A bad message is dead-lettered
on its own and never fails or delays the rest of its batch; so is a request whose event the
publisher refused for good (:class:`PublishRejected`). An event that reached the topic always gets
its row: when only the reply was refused, the request is dead-lettered after its row was flushed.
During a downstream failure the affected messages are held (their locks renewed) and retried with
backoff while receiving pauses, so an outage burns no delivery counts; nothing is dead-lettered for it.

Publishing overlaps settling: a batch's events go out on one publisher thread while the pump
thread flushes and settles the batches before it, so the round trip to the topic and the one that
settles no longer add up. At most one batch is publishing, and never during a receive (a receive
returns what it has once the next message lingers, and a second thread holding the GIL made it
linger: batches came back partial); every publish attempt (retries too) runs on that thread,
receiving and settling stay on the pump thread (the SDK's handlers are not thread-safe), and what
the publisher raises is raised again on the pump thread.

The pump is flow only: spans, metrics, logs and counters hang on the observer seam
(:mod:`worker.service.observe`). Build one with :func:`worker.bootstrap.bootstrap`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from schemas.models import MAX_COHORT_MEMBERS, AssignmentEvent, AssignmentRecord
from worker.domain.errors import PermanentError, PublishRejected, TransientError
from worker.service.handling import DEFAULT_MAX_BODY_BYTES, Handled, handle
from worker.service.observe import Counting, Disposition, Observers, PumpObserver, PumpStats, Settlement
from worker.service.ports import (
    Delivery,
    EventPublisher,
    ExperimentSource,
    MessageSource,
    OutboundEvent,
    RecordSink,
    SettlementLostError,
)

log = logging.getLogger(__name__)

__all__ = ["Disposition", "Pump", "PumpConfig", "PumpStats", "Settlement", "Stopping", "settled", "settlement_for"]


class Stopping(Exception):
    """The outcome of a message held when the pump stopped mid-outage: released for another replica."""

    def __init__(self) -> None:
        super().__init__("the worker is stopping; released for another replica")


def settlement_for(outcome: Handled | AssignmentEvent | BaseException) -> Settlement:
    """The one place that maps an outcome to a settlement.

    success → complete; permanent error (bad input, event refused for good) → dead-letter with its
    reason; lock lost or already settled → nothing to do, the broker redelivers; stopping, a
    transient failure or a bug → abandon (released for redelivery).
    """
    if isinstance(outcome, Handled | AssignmentEvent):
        return Settlement(Disposition.COMPLETE)
    if isinstance(outcome, PermanentError):
        return Settlement(Disposition.DEAD_LETTER, outcome.reason.value, outcome.description)
    if isinstance(outcome, SettlementLostError):
        return Settlement(Disposition.LOCK_LOST, "", str(outcome))
    return Settlement(Disposition.ABANDON, "", str(outcome))


def settled(count: int) -> Callable[[PumpStats], bool]:
    """For ``Pump.run(until=...)``: true once ``count`` messages were settled (any way)."""
    return lambda stats: stats.settled >= count


@dataclass(slots=True)
class PumpConfig:
    """Tuning of the pump; the settings object fills it in at the entry point."""

    queue_name: str = "assignment-requests"
    topic_name: str = "assignment-events"
    max_batch: int = 100
    max_wait: float = 1.0
    #: How long a receive still waits for a first message when held rows are due now: under a
    #: backlog the next batch arrives, and publishes while they are flushed and settled; on an idle
    #: queue their settlement lags by this much at most.
    overlap_wait: float = 0.1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    context_allow_list: Collection[str] = ()
    max_cohort_members: int = MAX_COHORT_MEMBERS
    drain_deadline: float = 25.0
    min_backoff: float = 0.5
    max_backoff: float = 30.0
    #: /healthz fails when the loop has not turned for this long (a wedged process). Backing off on
    #: purpose during an outage is turning: the wait beats the heartbeat.
    liveness_timeout: float = 120.0


@dataclass(slots=True)
class _InFlight:
    delivery: Delivery
    handled: Handled
    #: The broker messages for its events, serialised once: an outage retries the same messages.
    outbound: Sequence[OutboundEvent]
    #: Why the request is dead-lettered although some of its events reached the topic (its reply was
    #: refused for good): it is settled so only after those events' rows were flushed.
    refusal: PermanentError | None = None
    #: Its events the topic never accepted: they get no row.
    unpublished: frozenset[str] = frozenset()

    def records(self) -> list[AssignmentRecord]:
        """The rows of its events that reached the topic."""
        return [AssignmentRecord.from_event(e) for e in self.handled.events if e.event_id not in self.unpublished]


@dataclass(slots=True)
class _Publishing:
    """One batch whose events are on the publisher thread: its flights, their events, the attempt."""

    flights: Sequence[_InFlight]
    outbound: Sequence[Sequence[OutboundEvent]]
    attempt: Future[PublishRejected | None]


class Pump:
    """Drives a :class:`MessageSource` through handling into an :class:`EventPublisher` and :class:`RecordSink`."""

    def __init__(
        self,
        source: MessageSource,
        publisher: EventPublisher,
        sink: RecordSink,
        registry: ExperimentSource,
        *,
        config: PumpConfig | None = None,
        observers: Sequence[PumpObserver] = (),
        resources: Sequence[Callable[[], object]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.publisher = publisher
        self.sink = sink
        self.registry = registry
        self.config = config or PumpConfig()
        counting = Counting()
        self.stats = counting.stats
        self.observer = Observers([counting, *observers])
        #: Closed after the ports (e.g. the client they share).
        self._resources = list(resources)
        self._clock = clock
        self._pending: list[_InFlight] = []
        #: The rows of ``_pending``, kept to add again if a flush fails.
        self._pending_records: list[AssignmentRecord] = []
        self._stop = threading.Event()
        self._receive_failures = 0
        self._down: dict[str, str] = {}
        self._heartbeat = clock()
        #: The one thread every publish runs on (started by the first publish, shut down by drain).
        self._publisher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pump-publisher")
        self._publishing: _Publishing | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the pump to stop after the in-flight batch; safe from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def run(self, idle_exit: float | None = None, *, until: Callable[[PumpStats], bool] | None = None) -> PumpStats:
        """Process batches until stopped, ``until(stats)`` is true, or (with ``idle_exit``) the source stays empty."""
        idle_since: float | None = None
        try:
            while not self._stop.is_set():
                handled = self.run_once()
                if until is not None and until(self.stats):
                    break
                if handled or self._down:
                    idle_since = None
                elif idle_exit is not None:
                    idle_since = idle_since or self._clock()
                    if self._clock() - idle_since >= idle_exit:
                        break
        finally:
            self.drain()
        return self.stats

    def drain(self) -> None:
        """Flush the sink and settle everything held, then close the ports."""
        self._stop.set()
        try:
            self._finish_publish()
        finally:
            # Also after a publisher bug: what was published before it is flushed and settled.
            self._publisher_thread.shutdown(wait=True)
            self._flush_and_settle()
        for close in (self.source.close, self.publisher.close, self.sink.close, *self._resources):
            try:
                close()
            except Exception:
                log.exception("Error while closing %r", close)

    def health(self) -> tuple[bool, bool, str]:
        """(live, ready, detail) for the /healthz and /readyz probes."""
        live = self._clock() - self._heartbeat < self.config.liveness_timeout
        if self._stop.is_set():
            return live, False, "draining"
        if self._down:
            return live, False, "; ".join(f"{name} down: {why}" for name, why in sorted(self._down.items()))
        return live, True, "ok"

    # -- one batch ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Receive, handle and publish one batch; returns how many messages it received or settled.

        While the batch publishes, the batches before it are flushed and settled when the sink is
        due; the batch itself is recorded once published and settled by a later flush.
        """
        self._beat()
        deliveries = self._receive()
        if deliveries:
            self.observer.on_received(deliveries)
            self._start_publish(self._handle_batch(deliveries))
        flushed = 0
        if self._pending and (self.sink.due() or self._stop.is_set() or not deliveries):
            flushed = len(self._pending)
            self._flush_and_settle()
        self._finish_publish()
        return len(deliveries) + flushed

    def _receive(self) -> Sequence[Delivery]:
        try:
            deliveries = self.source.receive(self.config.max_batch, self._receive_wait())
        except TransientError as exc:
            # The broker is unreachable: back off (waking early on stop) and try again; the source
            # rebuilds its link, so the worker resumes by itself when the broker returns.
            self._unhealthy("broker", exc, self._receive_failures)
            self._backoff(self._receive_failures)
            self._receive_failures += 1
            return []
        self._receive_failures = 0
        self._healthy("broker")
        return deliveries

    def _receive_wait(self) -> float:
        """The configured wait, cut short when held rows fall due sooner: settlement is not kept waiting.

        Not below ``overlap_wait``: flushing due rows pays off while the next batch publishes.
        """
        due_in = self.sink.due_in() if self._pending else None
        if due_in is None:
            return self.config.max_wait
        return min(self.config.max_wait, max(self.config.overlap_wait, due_in))

    def _handle_batch(self, deliveries: Sequence[Delivery]) -> list[_InFlight]:
        """Handle each message; the ones with events to publish (the others are settled here)."""
        registry = self.registry()
        assigned: list[_InFlight] = []
        for delivery in deliveries:
            try:
                handled = handle(
                    delivery,
                    registry,
                    context_allow_list=self.config.context_allow_list,
                    max_body_bytes=self.config.max_body_bytes,
                    max_cohort_members=self.config.max_cohort_members,
                )
                # Serialised here, per message: an event that cannot be serialised is this message's
                # failure alone, never its batch's or the worker's.
                outbound = handled.outbound(delivery)
            except Exception as exc:
                # Bad input is dead-lettered; a bug abandons (the broker's max delivery count bounds it)
                # rather than stopping the whole worker.
                self.observer.on_handled(delivery, exc)
                self._settle(delivery, exc, None)
                continue
            self.observer.on_handled(delivery, handled)
            assigned.append(_InFlight(delivery, handled, outbound))
        return assigned

    def _start_publish(self, flights: Sequence[_InFlight]) -> None:
        """Hand the batch's events to the publisher thread (each turn ends with :meth:`_finish_publish`)."""
        if not flights:
            return
        outbound = [f.outbound for f in flights]
        attempt = self._publisher_thread.submit(self._publish_attempt, [m for ms in outbound for m in ms])
        self._publishing = _Publishing(flights, outbound, attempt)

    def _publish_attempt(self, messages: Sequence[OutboundEvent]) -> PublishRejected | None:
        """One publish, on the publisher thread: the events refused for good, if any (the rest was accepted)."""
        try:
            with self.observer.publishing(messages):
                self.publisher.publish(messages)
        except PublishRejected as exc:
            return exc
        return None

    def _finish_publish(self) -> None:
        """Wait for the batch on the publisher thread, retry it through an outage, then record and hold it."""
        publishing, self._publishing = self._publishing, None
        if publishing is None:
            return
        messages = [m for ms in publishing.outbound for m in ms]
        attempts = [publishing.attempt]
        refused = PublishRejected({})

        def attempt() -> None:
            nonlocal refused
            if not attempts:
                attempts.append(self._publisher_thread.submit(self._publish_attempt, messages))
            # Raises what the publisher raised: a transient failure is retried, a bug ends the pump.
            # The rest was accepted: never publish it again, whatever happens to the refused ones.
            refused = attempts.pop().result() or refused

        published = self._retry_until_stopped("event topic", attempt)
        accepted = self._accepted(publishing, refused) if published else publishing.flights
        if not published or self._given_up("record sink"):
            # Stopping mid-outage (the sink failed while this batch published): release it at once.
            for flight in accepted:
                self._settle(flight.delivery, Stopping(), flight.handled)
            return
        records = [record for flight in accepted for record in flight.records()]
        if records:
            self.sink.add(records)
        self._pending.extend(accepted)
        self._pending_records.extend(records)

    def _accepted(self, publishing: _Publishing, refused: PublishRejected) -> list[_InFlight]:
        """The flights with an event on the topic, to record; the others are dead-lettered with their refusal now.

        A flight whose reply was refused after its event reached the topic is among them, marked with
        its refusal: subscribers have that event, so its row is recorded before it is dead-lettered,
        and a replay later publishes the same event again (same id, same body) with a second row that
        the topic's duplicate detection and Kusto's dedup view drop.
        """
        rejected = refused.rejected
        if not rejected:
            return list(publishing.flights)
        accepted = []
        for flight, its in zip(publishing.flights, publishing.outbound, strict=True):
            refusal = next((rejected[m.message_id] for m in its if m.message_id in rejected), None)
            unpublished = frozenset(m.message_id for m in its if m.message_id in rejected) - refused.reached_topic
            if refusal is None:
                accepted.append(flight)
            elif len(unpublished) < len(its):
                flight.refusal, flight.unpublished = refusal, unpublished
                accepted.append(flight)
            else:
                self._settle(flight.delivery, refusal, flight.handled)
        return accepted

    def _flush_and_settle(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        records, self._pending_records = self._pending_records, []
        first = True

        def flush() -> None:
            nonlocal first
            if not first:
                # A failed flush dropped the rows (the RecordSink contract): add them again.
                self.sink.add(records)
            first = False
            self.sink.flush()

        if not self._retry_until_stopped("record sink", flush):
            for flight in pending:
                self._settle(flight.delivery, Stopping(), flight.handled)
            return
        lost = self.source.complete_batch([f.delivery for f in pending if f.refusal is None])
        lost_ids = {id(d) for d in lost}
        for flight in pending:
            if flight.refusal is not None:
                self._settle(flight.delivery, flight.refusal, flight.handled)
            elif id(flight.delivery) in lost_ids:
                self._report(flight.delivery, settlement_for(SettlementLostError("lock lost or already settled")), None)
            else:
                self._report(flight.delivery, settlement_for(flight.handled), flight.handled)

    # -- retries and health ------------------------------------------------------------------

    def _retry_until_stopped(self, dependency: str, action: Callable[[], None]) -> bool:
        """Run ``action`` until it succeeds (True) or the pump is stopping (False).

        While a dependency is down the pump stops receiving and holds what it has: the locks are
        kept alive by the source, so no delivery count is burned and healthy requests are never
        dead-lettered as MaxDeliveryCountExceeded because of someone else's outage.
        """
        attempt = 0
        while True:
            self._beat()
            try:
                action()
            except TransientError as exc:
                if self._stop.is_set():
                    self._down[dependency] = str(exc)
                    return False
                self._unhealthy(dependency, exc, attempt)
                self._backoff(attempt)
                attempt += 1
                continue
            self._healthy(dependency)
            return True

    def _given_up(self, dependency: str) -> bool:
        """True once the pump is stopping and ``dependency`` was down at its last attempt."""
        return self._stop.is_set() and dependency in self._down

    def _backoff(self, attempt: int) -> None:
        delay = min(self.config.max_backoff, self.config.min_backoff * 2 ** min(attempt, 16))
        self._wait(delay * (0.5 + random.random() / 2))

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` (waking early on stop), beating the heartbeat: holding on purpose is not wedged."""
        deadline = self._clock() + seconds
        step = max(0.01, self.config.liveness_timeout / 4)
        while not self._stop.is_set():
            self._beat()
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, step))

    def _beat(self) -> None:
        self._heartbeat = self._clock()

    def _unhealthy(self, dependency: str, exc: BaseException, attempt: int) -> None:
        self._down[dependency] = str(exc)
        self.observer.on_backoff(dependency, exc, attempt)

    def _healthy(self, dependency: str) -> None:
        if self._down.pop(dependency, None) is not None:
            self.observer.on_recovered(dependency)

    # -- settling ----------------------------------------------------------------------------

    def _settle(self, delivery: Delivery, outcome: Handled | BaseException, handled: Handled | None) -> None:
        settlement = settlement_for(outcome)
        try:
            if settlement.disposition is Disposition.COMPLETE:
                self.source.complete(delivery)
            elif settlement.disposition is Disposition.DEAD_LETTER:
                self.source.dead_letter(delivery, settlement.reason, settlement.description)
            elif settlement.disposition is Disposition.ABANDON:
                self.source.abandon(delivery)
        except SettlementLostError as exc:
            settlement = settlement_for(exc)
        self._report(delivery, settlement, handled)

    def _report(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        if settlement.disposition is Disposition.LOCK_LOST:
            self.observer.on_lock_lost(delivery, settlement)
        else:
            self.observer.on_settled(delivery, settlement, handled)
