"""Acting on chosen targets: receive in PEEK_LOCK, hold whatever is not a target, settle, release at the end.

Commands that change something receive and **hold** every message they do not act on, under renewed
locks, until they have reached every target; only then are the held messages released (abandoned).
Held messages cannot be received again, so a scan never stops early on messages that come back to
the head, never sees one dead letter twice, and raises another dead letter's delivery count at most
once per run. A message received on a link that dropped is never settled on another one (delivery
ids are per link): a scan outlives the connections under it and waits for what a dropped link had
locked to come back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import MessageAlreadySettled, MessageSizeExceededError, ServiceBusError

from adapters.sdk_guards import SdkSurfaceMissing
from adapters.servicebus.dlq.browse import letter_from
from adapters.servicebus.dlq.connection import (
    ConnectionDropped,
    Patience,
    close_quietly,
    gave_up,
    is_dropped,
    open_receiver,
)
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.dlq.letter import DeadLetter
from adapters.servicebus.dlq.outcome import (
    SKIP_DROPPED,
    SKIP_INTERRUPTED,
    SKIP_LOCK_LOST,
    SKIP_NOT_RECEIVED,
    Outcome,
)
from adapters.servicebus.dlq.selection import Selection
from adapters.servicebus.internals import settle_by_lock_token
from adapters.servicebus.lock import LockKeeper
from adapters.servicebus.settle import on_current_link, stamp_link
from worker.service.redaction import redact

log = logging.getLogger(__name__)

#: Settles one received target; returns ``None`` when done, or why it was skipped. It raises
#: :class:`TryAgain` to be given the message again when it comes back (its lock was lost after the
#: action was half done), and whatever the SDK raised when the connection dropped (see :func:`is_dropped`).
Action = Callable[[ServiceBusReceiver, ServiceBusReceivedMessage], str | None]

#: Empty receives in a row after which nothing more can come (one empty round can be spurious).
_EMPTY_ROUNDS = 2
#: Times one target may come back after a lost lock before it is reported skipped.
_TRIES = 3
#: Seconds a lock is assumed to last until one was seen (Service Bus's default lock duration).
_DEFAULT_LOCK = 60.0


class TryAgain(Exception):
    """The action could not finish (lock lost after its copy was sent): act again when the message comes back."""


class SettlementCut(ConnectionDropped):
    """The connection dropped during a settlement: the broker may or may not have applied it."""


class LinkReplaced(ConnectionDropped):
    """The message's link is gone and it cannot be settled by lock token either (the SDK's internals moved)."""


@dataclass
class _HoldingScan:
    """Receives until every target was reached, holding (under renewed locks) whatever it passes.

    One scan outlives the connections under it: :meth:`run` goes over one receiver and raises what
    the SDK raised when its connection drops, leaving the targets not yet settled pending for the
    next receiver. A target it had received on the dropped link is *stranded*: the next run settles
    it first, by its lock token over the new connection's management link (a delivery id names
    another message on a new link; a lock token names this one while its lock holds), instead of
    waiting for its lock to run out. Held messages that are not targets keep their locks until those
    run out. When the dropped link may have locked messages the scan was never handed (a receive
    was in progress, or left credit open), the next run keeps looking until those locks have lapsed
    before it calls a target not received.

    ``stop`` (Ctrl-C) ends a scan between two messages, never between sending a copy and completing
    its dead letter: what it holds is released as at any other end, and the targets it did not
    reach are left where they are.
    """

    act: Action
    outcome: Outcome
    keeper: LockKeeper
    pending: dict[int, DeadLetter]
    interval: float = 0.0
    on_progress: Callable[[DeadLetter, str], None] | None = None
    held: dict[int, ServiceBusReceivedMessage] = field(default_factory=dict)
    #: Receive calls and settlements that went through: a reconnect after progress is not a failure in a row.
    progress: int = 0
    batch: int = 100
    #: Receive calls in a row that found nothing.
    misses: int = 0
    #: Until when (monotonic) targets locked by a dropped link may still come back.
    stranded_until: float = 0.0
    #: The longest lock seen, in seconds (how long a dropped link's locks can last).
    lock_seconds: float | None = None
    tries: Counter[int] = field(default_factory=Counter)
    #: Targets whose settlement was cut off by a drop: if one is gone when the scan ends, it was applied.
    cut: set[int] = field(default_factory=set)
    #: Set (by a Ctrl-C handler) to end the scan between two messages.
    stop: threading.Event = field(default_factory=threading.Event)
    #: Targets received on a link that dropped, to settle by lock token on the next receiver.
    stranded: dict[int, ServiceBusReceivedMessage] = field(default_factory=dict)
    #: The link may have delivered messages the scan was never handed: a receive was in progress,
    #: or the last one returned fewer than it asked for (its credit stays open).
    outstanding: bool = False
    #: Settlement by lock token works here (False once the SDK's internals proved otherwise).
    by_token: bool = True

    @property
    def stopped(self) -> bool:
        """True once asked to stop: no further target is acted on."""
        return self.stop.is_set()

    def run(self, receiver: ServiceBusReceiver, max_wait: float) -> None:
        """Receive batches until no target is pending, or nothing more can come; then release what it held."""
        undecided: dict[int, ServiceBusReceivedMessage] = {}
        link: _LinkMark | None = None  # the link is opened by the first receive
        try:
            self._settle_stranded(receiver)
            while (
                self.pending
                and not self.stopped
                and (self.misses < _EMPTY_ROUNDS or time.monotonic() < self.stranded_until)
            ):
                wanted = min(self.batch, max(len(self.pending), 10))
                self.outstanding = True
                batch = receiver.receive_messages(max_message_count=wanted, max_wait_time=max_wait)
                self.outstanding = len(batch) < wanted
                self.progress += 1
                if link is not None and not link.current(receiver):
                    # The SDK replaced a dropped link inside the call: what the old one had locked
                    # comes back only when those locks run out.
                    self._strand(could_have_locked=self.misses == 0)
                    link = None
                link = link or _LinkMark.on(receiver)
                # An empty batch means everything receivable is held: a pending target was settled
                # or is locked elsewhere. A second empty round guards against a spurious one.
                self.misses = 0 if batch else self.misses + 1
                stamp_link(receiver, batch)
                self.keeper.hold(receiver, batch)
                self._note_locks(batch)
                # Until decided, a message is released if the run ends early (a refused copy raises):
                # a retry can then take it at once instead of waiting out its lock.
                undecided = {m.sequence_number or 0: m for m in batch}
                for message in batch:
                    if self.stopped:
                        break  # the rest of the batch is undecided: released below
                    self._take(receiver, message)
                    undecided.pop(message.sequence_number or 0)
        except Exception as exc:
            if is_dropped(exc):
                self._dropped({**undecided, **self.held})
            else:
                self.outcome.released += _release(receiver, self.keeper, {**undecided, **self.held})
                self.held.clear()
            raise
        self.outcome.released += _release(receiver, self.keeper, {**undecided, **self.held})
        self.held.clear()

    def finish(self, gone: Callable[[Sequence[int]], set[int]]) -> None:
        """Account for the targets never reached: done if a cut-off settlement had gone through, else skipped.

        Skipped as not received, or, when the scan was stopped, as left by the interruption.
        """
        applied = gone([seq for seq in self.pending if seq in self.cut])
        unreached = SKIP_INTERRUPTED if self.stopped else SKIP_NOT_RECEIVED
        for seq, letter in self.pending.items():
            if seq in applied:
                self.outcome.done.append(letter)  # the settlement a drop cut off had gone through
            else:
                self.outcome.skipped.append((letter, unreached))
        self.outcome.interrupted = self.stopped
        self.pending.clear()

    def give_up(self) -> None:
        """Report every target still pending as skipped: the connection kept dropping."""
        self.outcome.skipped.extend((letter, SKIP_DROPPED) for letter in self.pending.values())
        self.pending.clear()

    def _dropped(self, locked: Mapping[int, ServiceBusReceivedMessage]) -> None:
        for message in locked.values():
            self.keeper.release(message)
        self.outcome.lapsed += sum(1 for seq in locked if seq not in self.pending)
        if self.by_token:
            self.stranded.update((seq, message) for seq, message in locked.items() if seq in self.pending)
        self.held.clear()
        waiting_on_locks = any(seq in self.pending and seq not in self.stranded for seq in locked)
        self._strand(could_have_locked=self.outstanding or waiting_on_locks)

    def _settle_stranded(self, receiver: ServiceBusReceiver) -> None:
        """Act on the targets a dropped link had handed the scan, settling each by its lock token.

        One at a time out of :attr:`stranded`, so that those not reached when this connection drops
        too are still there for the next one.
        """
        self.keeper.hold(receiver, list(self.stranded.values()))  # renewed by token on this connection meanwhile
        while self.stranded and not self.stopped:
            seq = next(iter(self.stranded))
            message = self.stranded.pop(seq)
            if seq in self.pending:
                self._take(receiver, message)

    def _strand(self, *, could_have_locked: bool) -> None:
        """A link dropped: take smaller batches, and wait for the targets it may have locked.

        Those come back when their locks run out. A link whose last receive found nothing cannot
        have been handed a target since (there was none to hand), so a connection that keeps
        dropping while the scan waits does not make it wait for ever.
        """
        self.outcome.reconnects += 1
        # A smaller batch has a better chance of arriving whole on a connection that keeps dropping.
        self.batch = max(1, self.batch // 2)
        if could_have_locked:
            lock = self.lock_seconds if self.lock_seconds is not None else _DEFAULT_LOCK
            self.stranded_until = time.monotonic() + lock + 1.0

    def _note_locks(self, batch: Sequence[ServiceBusReceivedMessage]) -> None:
        now = datetime.now(UTC)
        for message in batch:
            until = message.locked_until_utc
            if until is not None:
                self.lock_seconds = max(self.lock_seconds or 0.0, (until - now).total_seconds())

    def _take(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> None:
        seq = message.sequence_number or 0
        target = self.pending.pop(seq, None)
        if target is None:
            # Not ours (or a copy that came back meanwhile): keep it locked so it cannot come
            # round again, and release it at the end.
            self.held[seq] = message
            return
        letter = letter_from(message)
        by_token = on_current_link(receiver, message) is not True
        try:
            why = _settle_target(self.act, receiver, message)
        except TryAgain as again:
            # Its lock was lost — or the settlement went through and only its answer was lost (a
            # retried settlement then finds no lock): it is back in the entity or gone, and the scan
            # tells which when it ends.
            self.keeper.release(message)
            self.cut.add(seq)
            self.tries[seq] += 1
            if self.tries[seq] < _TRIES:
                self.pending[seq] = target  # back with a new lock, at once: the old one is gone
                return
            why = str(again)
        except Exception as exc:
            if is_dropped(exc):
                self._keep_for_next_link(target, message, exc)
            raise
        self.keeper.release(message)
        self.cut.discard(seq)
        self.progress += 1
        self.outcome.by_lock_token += by_token and why is None
        if why is None:
            self.outcome.done.append(letter)
        else:
            self.outcome.skipped.append((letter, why))
            self.held[seq] = message
        if self.on_progress is not None:
            self.on_progress(letter, why or "done")
        if self.interval:
            self.stop.wait(self.interval)  # --rate's pause, cut short by a Ctrl-C

    def _keep_for_next_link(self, target: DeadLetter, message: ServiceBusReceivedMessage, exc: Exception) -> None:
        """A drop cut the action on ``target`` short: the next receiver acts on it again, by lock token if it can."""
        seq = target.sequence_number
        self.pending[seq] = target
        if isinstance(exc, LinkReplaced):
            self.by_token = False  # it comes back once its lock runs out: wait for that
        elif self.by_token:
            self.stranded[seq] = message
        if isinstance(exc, SettlementCut):
            self.cut.add(seq)


class _OneCallAtATime:
    """A receiver whose calls run one at a time, whichever thread makes them (the scan's, the lock keeper's).

    The SDK's handlers are not thread-safe: a renewal reopening a handler the scan's receive was
    tearing down after a dropped connection left it half built ("Handler failed: 'NoneType' object
    has no attribute …"). A renewal now waits for a receive in progress (at most its ``max_wait``),
    well inside any lock's duration.
    """

    def __init__(self, receiver: ServiceBusReceiver) -> None:
        self._receiver = receiver
        self._turn = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._receiver, name)
        # Private methods too: the lock keeper renews through the SDK's ``_renew_locks``.
        if name.startswith("__") or not callable(value):
            return value

        def one_at_a_time(*args: Any, **kwargs: Any) -> Any:
            with self._turn:
                return value(*args, **kwargs)

        return one_at_a_time


def _one_call_at_a_time(receiver: ServiceBusReceiver) -> ServiceBusReceiver:
    return cast(ServiceBusReceiver, _OneCallAtATime(receiver))


class _LinkMark:
    """Stamped with the link a receiver is on, to notice when the SDK replaces it inside a call."""

    @classmethod
    def on(cls, receiver: ServiceBusReceiver) -> _LinkMark:
        mark = cls()
        stamp_link(receiver, [mark])
        return mark

    def current(self, receiver: ServiceBusReceiver) -> bool:
        # Unknown (the SDK's link internals moved) counts as replaced: fail closed.
        return on_current_link(receiver, self) is True


def act_on_targets(
    client: ServiceBusClient,
    entity: Entity,
    found: Selection,
    outcome: Outcome,
    act: Action,
    *,
    dead_letter: bool = True,
    rate: float | None = None,
    on_progress: Callable[[DeadLetter, str], None] | None = None,
    max_wait: float = 2.0,
    keeper: LockKeeper | None = None,
    patience: Patience = Patience(),
    stop: threading.Event | None = None,
) -> None:
    """Act on every target, over as many receivers as dropped connections need; ``stop`` ends it early."""
    pending = {letter.sequence_number: letter for letter in found.targets}
    scan = _HoldingScan(act, outcome, keeper or LockKeeper(), pending, 1.0 / rate if rate else 0.0, on_progress)
    scan.stop = stop or scan.stop
    failures = 0
    try:
        while True:
            before = scan.progress
            receiver = _one_call_at_a_time(open_receiver(client, entity, dead_letter=dead_letter))
            try:
                scan.run(receiver, max_wait)
            except Exception as exc:
                if not is_dropped(exc):
                    raise
                failures = 1 if scan.progress > before else failures + 1
                log.info("Connection dropped under %s (%s); reconnecting", entity, redact(str(exc)))
                if patience.exhausted(failures) and not scan.stopped:
                    log.warning("Giving up on %s: %s", entity, gave_up("acting", failures, exc))
                    scan.give_up()
                    return
                if not scan.stopped:  # stopped: no reconnecting, the scan ends here
                    patience.wait(failures)
                    continue
            finally:
                close_quietly(receiver)
            scan.finish(lambda seqs: _gone(client, entity, seqs, dead_letter=dead_letter, patience=patience))
            return
    finally:
        if keeper is None:
            scan.keeper.close()


def _settle_target(act: Action, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
    try:
        return act(receiver, message)
    except MessageSizeExceededError as exc:
        return f"copy refused as too large: {exc}"


def _release(receiver: ServiceBusReceiver, keeper: LockKeeper, held: Mapping[int, ServiceBusReceivedMessage]) -> int:
    released = 0
    for message in held.values():
        keeper.release(message)
        if not on_current_link(receiver, message):
            continue  # its link is gone: its lock runs out by itself
        try:
            receiver.abandon_message(message)
            released += 1
        except (ServiceBusError, ValueError) as exc:
            # Already settled (a skipped target) or the lock ran out: it is back on the queue anyway.
            log.debug("release of sequence %s: %s", message.sequence_number, exc)
    return released


def settle_on_link(
    receiver: ServiceBusReceiver,
    message: ServiceBusReceivedMessage,
    action: str = "complete",
    *,
    reason: str | None = None,
    description: str | None = None,
) -> None:
    """Settle ``message`` (``complete`` or ``dead-letter``); :class:`TryAgain` when its lock was lost.

    On its own link by delivery id when that link is the receiver's current one. A message whose
    link dropped or was replaced is never settled by its delivery id on the new link, where that id
    names another message: it is settled by its lock token over the receiver's management link
    (:func:`~adapters.servicebus.internals.settle_by_lock_token`), or, when the SDK's internals do not
    allow that (its guard warns once), :class:`LinkReplaced` says it must come back first. A drop
    raises :class:`SettlementCut`.
    """
    try:
        if on_current_link(receiver, message) is True:
            if action == "dead-letter":
                receiver.dead_letter_message(message, reason=reason, error_description=description)
            else:
                receiver.complete_message(message)
        elif message.lock_token is None:  # settled already: nothing to settle it by
            raise MessageAlreadySettled()
        else:
            # Through the one-call-at-a-time receiver: the lock keeper may be renewing on it meanwhile.
            settle_by_lock_token(receiver, action, [message], reason=reason, description=description)
    except SdkSurfaceMissing:
        raise LinkReplaced("the link the message arrived on was replaced") from None
    except Exception as exc:
        if is_dropped(exc):
            raise SettlementCut(f"{type(exc).__name__}: {redact(str(exc))}") from exc
        if isinstance(exc, ServiceBusError | MessageAlreadySettled):
            raise TryAgain(f"{SKIP_LOCK_LOST} ({type(exc).__name__})") from None
        raise


def _gone(
    client: ServiceBusClient, entity: Entity, sequence_numbers: Sequence[int], *, dead_letter: bool, patience: Patience
) -> set[int]:
    """Which of ``sequence_numbers`` no longer exist in the entity (peeked, no lock; over a fresh connection).

    When the connection keeps dropping, those not known are assumed to be there: reported not
    received, and a later run looks again.
    """
    gone: set[int] = set()
    todo, failures = sorted(sequence_numbers), 0
    while todo:
        receiver = open_receiver(client, entity, dead_letter=dead_letter)
        try:
            while todo:
                found = receiver.peek_messages(max_message_count=1, sequence_number=todo[0])
                if not found or found[0].sequence_number != todo[0]:
                    gone.add(todo[0])
                todo.pop(0)
        except Exception as exc:
            if not is_dropped(exc):
                raise
            failures += 1
            if patience.exhausted(failures):
                return gone
            patience.wait(failures)
        finally:
            close_quietly(receiver)
    return gone
