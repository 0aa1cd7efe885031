"""What a command did (or, with a dry run, would do) with the targets it chose, and why it skipped any.

Pure: no SDK.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.servicebus.dlq.letter import DeadLetter
from adapters.servicebus.dlq.selection import Selection

SKIP_NOT_RECEIVED = "not received: settled meanwhile or locked by another receiver"
SKIP_LOCK_LOST = "lock lost before it could be settled; still there"
SKIP_DROPPED = "the connection kept dropping before it was done; run again to finish (nothing is lost or sent twice)"
SKIP_INTERRUPTED = "interrupted (Ctrl-C) before it was reached; left where it was"


@dataclass
class Outcome:
    """What a command did (or, with a dry run, would do)."""

    selection: Selection
    done: list[DeadLetter] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)
    released: int = 0
    cancelled: bool = False
    #: Connections that dropped under the command and were replaced.
    reconnects: int = 0
    #: Messages held on a connection that dropped: nobody can release them, their locks run out.
    lapsed: int = 0
    #: Replay only: dead letters completed without sending, their copy being there already.
    already_there: int = 0
    #: Stopped by a Ctrl-C between two targets: those not reached were left where they were.
    interrupted: bool = False
    #: Targets received on a connection that dropped, settled by lock token over a new one.
    by_lock_token: int = 0

    @property
    def replayed(self) -> list[DeadLetter]:
        """The letters acted on (replayed, purged or dead-lettered)."""
        return self.done

    @property
    def not_matching(self) -> int:
        """Browsed but outside the filter."""
        return self.selection.not_matching


def go_ahead(
    found: Selection,
    outcome: Outcome,
    dry_run: bool,
    confirm: Callable[[Selection], bool] | None,
    stop: threading.Event | None = None,
) -> bool:
    """Whether to act on what ``select`` found: not on a dry run (which reports it done), nothing, a no, or a Ctrl-C."""
    if dry_run:
        outcome.done = list(found.targets)
        return False
    if not found.targets:
        return False
    if confirm is not None and not confirm(found):
        outcome.cancelled = True
        return False
    if stop is not None and stop.is_set():
        outcome.interrupted = True
        outcome.skipped.extend((letter, SKIP_INTERRUPTED) for letter in found.targets)
        return False
    return True
