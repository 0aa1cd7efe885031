"""Settling many completions with one AMQP disposition per run of consecutive delivery ids.

The SDK completes one message per round trip and waits for the broker's answer each time; an AMQP
disposition may cover a range of delivery ids (Microsoft's AMQP stack settles ``first..last`` on the
receiving side), which is 3-4x faster here. No public SDK API does this: the disposition, the
delivery ids and the link a message arrived on are read through :mod:`adapters.servicebus.internals`,
whose guards fail closed. A surprise (an SDK upgrade renamed something) turns range settlement off
(the guard's one WARNING) and the caller completes those messages one by one, which is always correct.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import TYPE_CHECKING, cast

from opentelemetry import metrics

from adapters.sdk_guards import SdkSurfaceMissing
from adapters.servicebus import internals
from worker.service.ports import Delivery
from worker.service.redaction import redact

if TYPE_CHECKING:
    from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver

log = logging.getLogger(__name__)

#: Seconds to wait for the broker's outcome of one range disposition. Short: a range that is not
#: confirmed in time is completed one by one instead (each of those reports its own outcome).
DEFAULT_OUTCOME_TIMEOUT = 5.0


def received_message(delivery: Delivery) -> ServiceBusReceivedMessage:
    """The SDK message a delivery from Service Bus carries (``convert.to_delivery`` put it in ``handle``)."""
    return cast("ServiceBusReceivedMessage", delivery.handle)


class RangeSettlement:
    """Completes runs of consecutive deliveries with one disposition each; off for good after a surprise.

    ``settlements`` counts range dispositions the broker confirmed and ``settled_messages`` the
    messages they covered (also exported as the ``ab.range_settlements`` metric); ``enabled`` turns
    False the first time the SDK's internals are not what this code expects (the guard's WARNING,
    once per process).
    """

    def __init__(
        self,
        *,
        outcome_timeout: float = DEFAULT_OUTCOME_TIMEOUT,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.enabled = True
        self.outcome_timeout = outcome_timeout
        self.settlements = 0
        self.settled_messages = 0
        #: Range dispositions that failed the expected way (link broke, outcome timed out).
        self.failures = 0
        meter = metrics.get_meter("ab_assignment_worker.servicebus", meter_provider=meter_provider)
        self._counter = meter.create_counter(
            "ab.range_settlements", description="Completions settled by one AMQP disposition over a range"
        )

    def settle(self, receiver: ServiceBusReceiver, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Complete what it can by ranges; returns the deliveries the caller must complete one by one."""
        if not self.enabled or len(deliveries) < 2:
            return list(deliveries)
        settled: set[int] = set()
        try:
            failed = internals.range_errors()
            for run in _consecutive_runs(deliveries):
                try:
                    if len(run) > 1 and self._settle_run(receiver, run):
                        settled.update(id(d) for d in run)
                except failed as exc:
                    # The link broke or the outcome did not come in time: each message reports its own.
                    self.failures += 1
                    log.info("Range settlement failed (%s); completing one by one", redact(str(exc)))
        except SdkSurfaceMissing as exc:
            self.turn_off(str(exc))
        except Exception as exc:  # anything else the SDK's internals did that this code does not expect
            internals.GUARDS.trip(internals.RANGE_SETTLEMENT, exc)
            self.turn_off(f"{type(exc).__name__}: {redact(str(exc))}")
        return [d for d in deliveries if id(d) not in settled]

    def turn_off(self, why: str) -> None:
        """Settle one message per round trip from now on (the guard that tripped has said why, once per process)."""
        if self.enabled:
            self.enabled = False
            log.info("Range settlement turned off: %s; completing one message per round trip from now on", why)

    def _settle_run(self, receiver: ServiceBusReceiver, run: list[Delivery]) -> bool:
        messages = [received_message(d) for d in run]
        # Delivery ids are per link: every message of a range must be from the receiver's current link.
        if any(on_current_link(receiver, m) is not True for m in messages):
            return False
        now = datetime.now(UTC)
        if not all(_settleable(m, now) for m in messages):
            return False
        internals.settle_range(receiver, messages, self.outcome_timeout)
        self.settlements += 1
        self.settled_messages += len(messages)
        self._counter.add(1)
        return True


def _settleable(message: ServiceBusReceivedMessage, now: datetime) -> bool:
    """Not settled yet (a settled message has no lock token) and its lock not expired."""
    locked_until = message.locked_until_utc
    return message.lock_token is not None and (locked_until is None or locked_until > now)


#: Each received message carries the receiver and the identity of the AMQP link it arrived on.
_LINK_ATTRIBUTE = "_ab_received_on"

#: The stamp of a message whose link could not be told (an SDK whose internals moved).
UNKNOWN_LINK = None


def stamp_link(receiver: ServiceBusReceiver, messages: Sequence[object]) -> None:
    """Remember which link each message arrived on (the SDK reopens its handler, a new link, after errors).

    By weak reference: a message must not keep a dead connection (and its socket) alive; a link that
    was collected is not the current one. Any object that takes an attribute can be stamped (the
    dead-letter tools stamp a mark of their own), hence ``object``.
    """
    identity = internals.link_identity(receiver)
    if messages and identity is not None and identity[0] is not None and identity[1] is None:
        # Messages just came over a link, so the handler has one: the SDK keeps it elsewhere now.
        internals.GUARDS.trip(internals.LINK_IDENTITY, "an open handler without a link")
        identity = None
    stamp = UNKNOWN_LINK
    if identity is not None:
        try:
            stamp = tuple(None if part is None else weakref.ref(part) for part in (receiver, *identity))
        except TypeError as exc:  # an SDK whose objects take no weak reference: the link cannot be told
            internals.GUARDS.trip(internals.LINK_IDENTITY, exc)
    for message in messages:
        try:
            setattr(message, _LINK_ATTRIBUTE, stamp)
        except AttributeError as exc:  # a message that takes no attribute (__slots__): unknown, as unstamped
            internals.GUARDS.trip(internals.LINK_IDENTITY, exc)
            return


def on_current_link(receiver: ServiceBusReceiver, message: object) -> bool | None:
    """True when ``message`` arrived on the link ``receiver`` is on now; None when that cannot be told.

    AMQP delivery ids are per link and start again at 0 on a new one: settling a message from an
    earlier link by its delivery id would settle whichever new message holds that id — completing a
    request whose event was never published. A message from a replaced link is settled by its lock
    token over the management link instead (:func:`adapters.servicebus.internals.settle_by_lock_token`).

    Fails closed: when the SDK's link internals cannot be read (on the message's receipt or now) the
    answer is None, never True (the link identity guard's WARNING, once per process), and the caller
    turns range settlement off.
    """
    stamped = getattr(message, _LINK_ATTRIBUTE, UNKNOWN_LINK)
    identity = internals.link_identity(receiver)
    if stamped is UNKNOWN_LINK or identity is None:
        internals.GUARDS.trip(internals.LINK_IDENTITY, "the link a message arrived on is not known")
        return None
    handler, link = identity
    if handler is None:
        return False
    seen = [None if ref is None else ref() for ref in stamped]
    # No link is never the current one (a message from it is settled by lock token instead).
    return bool(link is not None and seen[0] is receiver and seen[1] is handler and seen[2] is link)


def _consecutive_runs(deliveries: Sequence[Delivery]) -> list[list[Delivery]]:
    """Split into runs whose AMQP delivery ids are consecutive (one disposition can cover each run)."""
    # Each delivery id read once (the key), then kept beside its delivery.
    numbered = sorted(((internals.delivery_id(received_message(d)), d) for d in deliveries), key=itemgetter(0))
    runs: list[list[Delivery]] = []
    previous = -2  # no delivery id follows it: ids start at 0
    for number, delivery in numbered:
        if number == previous + 1:
            runs[-1].append(delivery)
        else:
            runs.append([delivery])
        previous = number
    return runs
