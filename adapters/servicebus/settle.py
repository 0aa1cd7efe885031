"""Settling many completions with one AMQP disposition per run of consecutive delivery ids.

The SDK completes one message per round trip and waits for the broker's answer each time; an AMQP
disposition may cover a range of delivery ids (Microsoft's AMQP stack settles ``first..last`` on the
receiving side), which is 3-4x faster here. No public SDK API does this, so it uses the pinned SDK's
internals (``receiver._handler.settle_messages``, ``message._delivery_id``, ``_delivery_tag``,
``_settled``). Every access to them is in :meth:`RangeSettlement.settle` and nowhere else, inside one
``try``: a surprise (an SDK upgrade renamed something) turns range settlement off with a WARNING and
the caller completes those messages one by one, which is always correct.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry import metrics

from worker.service.ports import Delivery
from worker.service.redaction import redact

log = logging.getLogger(__name__)

#: Seconds to wait for the broker's outcome of one range disposition. Short: a range that is not
#: confirmed in time is completed one by one instead (each of those reports its own outcome).
DEFAULT_OUTCOME_TIMEOUT = 5.0


class RangeSettlement:
    """Completes runs of consecutive deliveries with one disposition each; off for good after a surprise.

    ``settlements`` counts range dispositions the broker confirmed and ``settled_messages`` the
    messages they covered (also exported as the ``ab.range_settlements`` metric); ``enabled`` turns
    False, with one WARNING, the first time the SDK's internals are not what this code expects.
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

    def settle(self, receiver: Any, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Complete what it can by ranges; returns the deliveries the caller must complete one by one."""
        if not self.enabled or len(deliveries) < 2:
            return list(deliveries)
        settled: set[int] = set()
        try:
            # Imported here so that an SDK that moved it is one more surprise, not an import error.
            from azure.servicebus._pyamqp.error import AMQPException

            for run in _consecutive_runs(deliveries):
                try:
                    if len(run) > 1 and self._settle_run(receiver, run):
                        settled.update(id(d) for d in run)
                except (AMQPException, TimeoutError, ValueError, OSError) as exc:
                    # The link broke or the outcome did not come in time: each message reports its own.
                    self.failures += 1
                    log.info("Range settlement failed (%s); completing one by one", redact(str(exc)))
        except Exception as exc:
            self.enabled = False
            log.warning(
                "Range settlement turned off: the Service Bus SDK's internals are not as expected (%s: %s); "
                "completing one message per round trip from now on",
                type(exc).__name__,
                redact(str(exc)),
            )
        return [d for d in deliveries if id(d) not in settled]

    def turn_off(self, why: str) -> None:
        """Settle one message per round trip from now on (logged once)."""
        if self.enabled:
            self.enabled = False
            log.warning("Range settlement turned off: %s; completing one message per round trip from now on", why)

    def _settle_run(self, receiver: Any, run: list[Delivery]) -> bool:
        messages = [d.handle for d in run]
        # Delivery ids are per link: every message of a range must be from the receiver's current link.
        if any(on_current_link(receiver, m) is not True for m in messages):
            return False
        now = datetime.now(UTC)
        if any(m._settled or (m.locked_until_utc is not None and m.locked_until_utc <= now) for m in messages):
            return False
        receiver._handler.settle_messages(
            (messages[0]._delivery_id, messages[-1]._delivery_id),
            messages[0]._delivery_tag,
            "accepted",
            await_outcome=True,
            outcome_timeout=self.outcome_timeout,
        )
        for message in messages:
            message._settled = True
        self.settlements += 1
        self.settled_messages += len(messages)
        self._counter.add(1)
        return True


#: Each received message carries the receiver and the identity of the AMQP link it arrived on.
_LINK_ATTRIBUTE = "_ab_received_on"

#: The stamp of a message whose link could not be told (an SDK whose internals moved).
UNKNOWN_LINK = None

#: Warnings given once per process.
_warned: set[str] = set()


def link_identity(receiver: Any) -> tuple[Any, Any] | None:
    """The objects that change when the SDK opens a new receive link: its handler and the handler's link.

    None when the pinned SDK's internals (``receiver._handler._link``) are not there: the link
    cannot be told, and the caller must not settle by delivery id (see :func:`on_current_link`).
    A receiver whose handler was shut down (``_handler`` is None) has no link: ``(None, None)``.
    """
    try:
        handler = receiver._handler
        link = None if handler is None else handler._link
    except AttributeError:
        return UNKNOWN_LINK
    return handler, link


def stamp_link(receiver: Any, messages: Sequence[Any]) -> None:
    """Remember which link each message arrived on (the SDK reopens its handler, a new link, after errors).

    By weak reference: a message must not keep a dead connection (and its socket) alive; a link that
    was collected is not the current one.
    """
    identity = link_identity(receiver)
    stamp = None
    if identity is not None:
        try:
            stamp = tuple(None if part is None else weakref.ref(part) for part in (receiver, *identity))
        except TypeError:  # an SDK whose objects take no weak reference: the link cannot be told
            stamp = None
    for message in messages:
        setattr(message, _LINK_ATTRIBUTE, stamp)


def on_current_link(receiver: Any, message: Any) -> bool | None:
    """True when ``message`` arrived on the link ``receiver`` is on now; None when that cannot be told.

    AMQP delivery ids are per link and start again at 0 on a new one: settling a message from an
    earlier link by its delivery id would settle whichever new message holds that id — completing a
    request whose event was never published. A message from a replaced link is settled by its lock
    token over the management link instead (:mod:`adapters.servicebus.mgmt`).

    Fails closed: when the SDK's link internals cannot be read (on the message's receipt or now) the
    answer is None, never True, and the first such answer turns range settlement off with a WARNING
    (:meth:`RangeSettlement.settle` checks it).
    """
    stamped = getattr(message, _LINK_ATTRIBUTE, None)
    identity = link_identity(receiver)
    if stamped is None or identity is None:
        _warn_unknown_link()
        return None
    handler, link = identity
    if handler is None:
        return False
    seen = [None if ref is None else ref() for ref in stamped]
    return bool(seen[0] is receiver and seen[1] is handler and seen[2] is link)


def _warn_unknown_link() -> None:
    if "unknown link" not in _warned:
        _warned.add("unknown link")
        log.warning(
            "Cannot tell which AMQP link a message arrived on: the Service Bus SDK's internals are not as "
            "expected; range settlement is off and each message is settled through the SDK's own API"
        )


def _consecutive_runs(deliveries: Sequence[Delivery]) -> list[list[Delivery]]:
    """Split into runs whose AMQP delivery ids are consecutive (one disposition can cover each run)."""
    ordered = sorted(deliveries, key=lambda d: d.handle._delivery_id)
    runs: list[list[Delivery]] = []
    for delivery in ordered:
        if runs and delivery.handle._delivery_id == runs[-1][-1].handle._delivery_id + 1:
            runs[-1].append(delivery)
        else:
            runs.append([delivery])
    return runs
