"""Which dead letters a command acts on: the filter, and the choice made up front from everything browsed.

Pure: no SDK. Every command browses the whole entity first and decides here, so a match is never
missed wherever it sits, and nothing is capped silently: what ``--max-replays`` or ``--limit`` leaves
out is counted as skipped, with its reason. ``purge --from`` chooses by a file instead of a filter.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from adapters.servicebus.dlq.letter import DeadLetter

log = logging.getLogger(__name__)

SKIP_TOO_MANY = "replayed --max-replays times already"
SKIP_LIMIT = "over --limit (left for a later run)"
SKIP_NOT_AS_EXPORTED = "its body is not the one the file says was exported: not the dead letter the file names"


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to act on."""

    reason: str | None = None
    experiment: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def is_empty(self) -> bool:
        """True when it matches everything."""
        return not (self.reason or self.experiment or self.since or self.until)

    def matches(self, letter: DeadLetter) -> bool:
        """True when the letter passes every given criterion."""
        if self.reason and letter.reason != self.reason:
            return False
        if self.experiment and letter.request.get("experiment_id") != self.experiment:
            return False
        when = letter.enqueued_time
        if self.since and (when is None or when < self.since):
            return False
        return not (self.until and (when is None or when > self.until))


@dataclass
class Selection:
    """What a browse found: the targets to act on, in sequence order, and everything else counted."""

    scanned: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    matched: list[DeadLetter] = field(default_factory=list)
    targets: list[DeadLetter] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)
    #: The message id of every letter browsed: a replay's copy that was dead-lettered again is here.
    message_ids: set[str] = field(default_factory=set)
    #: Named by a file (``purge --from``) but not in the entity: removed already, or from another entity.
    not_found: list[DeadLetter] = field(default_factory=list)

    @property
    def not_matching(self) -> int:
        """Browsed but outside the filter."""
        return self.scanned - len(self.matched)


def choose(
    letters: Iterable[DeadLetter],
    selection: ReplayFilter,
    *,
    max_replays: int | None = None,
    limit: int | None = None,
) -> Selection:
    """Decide, from every letter browsed, which ones to act on (never capped silently)."""
    found = Selection()
    for letter in letters:
        found.scanned += 1
        found.reasons[letter.reason] += 1
        if letter.message_id:
            found.message_ids.add(letter.message_id)
        if not selection.matches(letter):
            continue
        found.matched.append(letter)
        if max_replays is not None and letter.replay_count >= max_replays:
            log.warning(
                "Skipping message %s (sequence %d): already replayed %d times (limit %d); fix it by hand or export it",
                letter.message_id,
                letter.sequence_number,
                letter.replay_count,
                max_replays,
            )
            found.skipped.append((letter, SKIP_TOO_MANY))
        elif limit is not None and len(found.targets) >= limit:
            found.skipped.append((letter, SKIP_LIMIT))
        else:
            found.targets.append(letter)
    return found


def choose_exported(letters: Iterable[DeadLetter], exported: Sequence[DeadLetter]) -> Selection:
    """The dead letters an export file names, and only those (``dlq purge --from``).

    A dead letter is the one a line names when its sequence number *and* message id are the line's
    (a sequence number alone could name another message in another entity, or after the entity was
    recreated; message ids are the publisher's and may repeat), and its body is the one exported:
    its digest is the line's ``body_sha256``, which ``dlq export`` writes and a repair leaves as it
    was. A line without one (written by hand, or by an export before it existed) must carry the body
    unchanged. A dead letter that matches on the keys but not on the body is skipped, never removed.
    """
    named = {(line.sequence_number, line.message_id): line for line in exported}
    found = Selection()
    seen: set[tuple[int, str | None]] = set()
    for letter in letters:
        found.scanned += 1
        found.reasons[letter.reason] += 1
        key = (letter.sequence_number, letter.message_id)
        line = named.get(key)
        if line is None:
            continue
        seen.add(key)
        found.matched.append(letter)
        if letter.body_sha256 == (line.exported_sha256 or line.body_sha256):
            found.targets.append(letter)
        else:
            found.skipped.append((letter, SKIP_NOT_AS_EXPORTED))
    found.not_found = [line for key, line in named.items() if key not in seen]
    return found
