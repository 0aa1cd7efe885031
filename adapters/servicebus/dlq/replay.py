"""``dlq replay``: send each chosen dead letter's copy back to its entity, then complete the dead letter.

Loss-free by construction: each copy is sent first and the dead letter completed only after the
broker accepted the copy. Idempotent across runs and interruptions: a dead letter always gets the
same copy id (:mod:`adapters.servicebus.dlq.replay_copy`), and a copy already out (on the entity,
back in the dead-letter queue, or sent earlier in the run) is recognised by its id and not sent
again. ``replay --from`` resubmits an exported, possibly repaired, file the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusReceiver

from adapters.servicebus.dlq.browse import letter_from, pages, select
from adapters.servicebus.dlq.connection import Patience, close_quietly, gave_up, is_dropped, open_sender
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.dlq.holding import act_on_targets, settle_on_link
from adapters.servicebus.dlq.letter import DeadLetter
from adapters.servicebus.dlq.outcome import Outcome, go_ahead
from adapters.servicebus.dlq.replay_copy import ReplayCopy, replay_copy
from adapters.servicebus.dlq.selection import ReplayFilter, Selection
from adapters.servicebus.lock import LockKeeper
from worker.service.handling import REPLAY_ORIGINAL_MESSAGE_ID


def replay_message(
    letter: DeadLetter, entity: Entity, now: datetime | None = None, *, kind: str = "replay"
) -> ServiceBusMessage:
    """The SDK message of :func:`~adapters.servicebus.dlq.replay_copy.replay_copy`: what replay sends for ``letter``."""
    copy = replay_copy(letter, entity, now, kind=kind)
    return ServiceBusMessage(**{f.name: getattr(copy, f.name) for f in fields(ReplayCopy)})


class _Copies:
    """Sends each dead letter's copy at most once, whatever drops, and knows the copies already out.

    A copy's id is a function of the dead letter (:func:`~adapters.servicebus.dlq.replay_copy.replay_message_id`),
    so a copy already on the entity (sent by an interrupted run whose completion of the dead letter was lost), one that
    came back into the dead-letter queue (dead-lettered again meanwhile), or one sent earlier in this
    run (before a dropped connection) is recognised by its id and not sent again.
    """

    def __init__(self, client: ServiceBusClient, entity: Entity, out: set[str]) -> None:
        self._client = client
        self._entity = entity
        self.out = out
        self._sender: Any = None

    def send(self, copy: ServiceBusMessage) -> bool:
        """Send ``copy`` unless a copy with its id is out already; True when it was sent now."""
        if copy.message_id in self.out:
            return False
        if self._sender is None:
            self._sender = open_sender(self._client, self._entity)
        try:
            self._sender.send_messages(copy)
        except Exception as exc:
            if is_dropped(exc):
                # Perhaps accepted, perhaps not: the next attempt sends the same id again, which
                # duplicate detection drops if the first one went through.
                self.close()
            raise
        self.out.add(str(copy.message_id))
        return True

    def close(self) -> None:
        """Close the sender (a new one is opened for the next copy)."""
        sender, self._sender = self._sender, None
        if sender is not None:
            close_quietly(sender)


def check_copy(letter: DeadLetter) -> None:
    """Raise ``ValueError`` saying why the SDK will not build ``letter``'s copy (``replay --from`` checks each line).

    The entity only names the copy's history (its fallback id, a subscription tag), never anything
    the SDK checks, so any entity does.
    """
    try:
        replay_message(letter, Entity(queue="check"), kind="file-replay")
    except ValueError as exc:
        raise ValueError(f"its copy cannot be sent as it is: {exc}") from None


def unbuildable(exc: ValueError) -> str:
    """The skip reason of a dead letter whose copy the SDK will not build: left where it is, for repair by file."""
    return f"its copy cannot be sent as it is ({exc}); export it, repair the line and replay --from the file"


def copies_out(client: ServiceBusClient, entity: Entity, patience: Patience = Patience()) -> set[str]:
    """The message ids of replayed copies waiting on ``entity`` (for a subscription: on it, not its topic)."""
    return {
        str(message.message_id)
        for page in pages(client, entity, dead_letter=False, patience=patience)
        for message in page
        if message.message_id is not None and _is_copy(message)
    }


def _is_copy(message: ServiceBusReceivedMessage) -> bool:
    keys = (message.application_properties or {}).keys()
    return REPLAY_ORIGINAL_MESSAGE_ID in keys or REPLAY_ORIGINAL_MESSAGE_ID.encode() in keys


def replay(
    client: ServiceBusClient,
    entity: Entity,
    selection: ReplayFilter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    max_replays: int = 5,
    rate: float | None = None,
    on_progress: Callable[[DeadLetter, str], None] | None = None,
    confirm: Callable[[Selection], bool] | None = None,
    max_wait: float = 2.0,
    keeper: LockKeeper | None = None,
    patience: Patience = Patience(),
    stop: threading.Event | None = None,
) -> Outcome:
    """Move matching dead letters back to their entity: resubmit, then complete the DLQ copy.

    Idempotent: the same dead letter always gets the same copy id, and a copy already on the entity,
    back in the dead-letter queue or sent earlier in the run is not sent again (its dead letter is
    just completed). Connections that drop are replaced and the run goes on (see :class:`Patience`).
    ``stop`` (set by a Ctrl-C) ends the run between two dead letters: the outcome says what was done.
    """
    found = select(client, entity, selection, max_replays=max_replays, limit=limit, patience=patience)
    outcome = Outcome(found, skipped=list(found.skipped))
    if not go_ahead(found, outcome, dry_run, confirm, stop):
        return outcome
    copies = _Copies(client, entity, copies_out(client, entity, patience) | found.message_ids)

    def resubmit(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
        try:
            copy = replay_message(letter_from(message), entity)
        except ValueError as exc:
            # Building a message is no I/O: its ValueError is about this dead letter (a session id
            # over 128 characters, say), never a dropped connection, which is_dropped takes it for.
            return unbuildable(exc)
        if not copies.send(copy):
            outcome.already_there += 1
        settle_on_link(receiver, message, "complete")
        return None

    try:
        act_on_targets(
            client,
            entity,
            found,
            outcome,
            resubmit,
            rate=rate,
            on_progress=on_progress,
            max_wait=max_wait,
            keeper=keeper,
            patience=patience,
            stop=stop,
        )
    finally:
        copies.close()
    return outcome


@dataclass(frozen=True)
class Resubmitted:
    """What ``replay --from`` did with a file's dead letters."""

    sent: int
    #: A copy with the same id was waiting on the entity already (a re-run of the file): not sent again.
    already_out: int
    #: Not reached: the run was interrupted (Ctrl-C) before them.
    left: int


def replay_from_file(
    client: ServiceBusClient,
    entity: Entity,
    letters: Sequence[DeadLetter],
    *,
    rate: float | None = None,
    patience: Patience = Patience(),
    stop: threading.Event | None = None,
) -> Resubmitted:
    """Resubmit exported (possibly hand-repaired) dead letters, in the file's order.

    A copy already waiting on the entity (a re-run of the same file) is not sent again; a dropped
    connection is replaced and the same copy sent again (duplicate detection drops a second one).
    ``stop`` (set by a Ctrl-C) ends the run between two sends.
    """
    interval = 1.0 / rate if rate else 0.0
    stop = stop or threading.Event()
    copies = _Copies(client, entity, copies_out(client, entity, patience))
    sent = done = 0
    try:
        for letter in letters:
            if stop.is_set():
                break
            copy = replay_message(letter, entity, kind="file-replay")
            failures = 0
            while True:
                try:
                    sent += copies.send(copy)
                    break
                except Exception as exc:
                    if not is_dropped(exc):
                        raise
                    failures += 1
                    if patience.exhausted(failures):
                        raise gave_up(f"sending to {entity}", failures, exc) from None
                    patience.wait(failures)
            done += 1
            if interval:
                stop.wait(interval)  # --rate's pause, cut short by a Ctrl-C
    finally:
        copies.close()
    return Resubmitted(sent=sent, already_out=done - sent, left=len(letters) - done)
