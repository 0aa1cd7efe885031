"""Dead-letter (and active-queue) operations on Service Bus, through the real SDK.

Every command first *browses* the whole entity by sequence number (peek: no lock, no delivery
count), so it knows every match wherever it sits. Commands that change something then receive in
PEEK_LOCK and **hold** every message they do not act on, under renewed locks, until they have
reached every match; only then are the held messages released (abandoned). Held messages cannot be
received again, so a scan never stops early on messages that come back to the head, never sees one
dead letter twice, and raises another dead letter's delivery count at most once per run.

Replay is loss-free by construction: each copy is sent first and the dead letter completed only
after the broker accepted the copy. The copy carries a new, deterministic message id (the original
id, the replay count and a digest of the body), so the entity's duplicate detection cannot drop it
as a repeat of the original, while a second copy of the *same* replay (after a lost lock) is dropped;
and it carries the original's message id and enqueued time, from which the worker derives its event
ids and decision time, so a replayed request publishes the original's events byte for byte.

Every command rides out dropped connections: it opens a new receiver (or sender) and goes on, and a
message received on a link that dropped is never settled on another one (delivery ids are per link).
Replay is idempotent across runs and interruptions: a copy already out (on the entity, back in the
dead-letter queue, or sent earlier in the run) is recognised by its id and not sent again.

One idea per module; the pure ones import no SDK:

- ``entity``: the queue or topic subscription a command acts on (pure)
- ``letter``: the dead-letter model, its reasons and the export format (pure)
- ``selection``: the filter and the up-front choice of targets (pure)
- ``outcome``: what a command did and why it skipped a target (pure)
- ``replay_copy``: the copy's deterministic id and the properties that carry its history (pure)
- ``connection``: opening receivers and senders, riding out dropped connections
- ``browse``: reading an entity without changing it
- ``holding``: receive, hold what is not a target, settle on the message's own link, release
- ``replay``, ``purge`` (also ``purge --from``), ``active``: the commands that change something

This package's namespace is the API the command line and the tests use.
"""

from __future__ import annotations

from adapters.servicebus.dlq.active import dead_letter_active
from adapters.servicebus.dlq.browse import browse, peek, select
from adapters.servicebus.dlq.connection import Patience, is_dropped
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.dlq.letter import KNOWN_REASONS, DeadLetter
from adapters.servicebus.dlq.outcome import SKIP_INTERRUPTED, SKIP_NOT_RECEIVED, Outcome
from adapters.servicebus.dlq.purge import purge, purge_exported
from adapters.servicebus.dlq.replay import Resubmitted, check_copy, replay, replay_from_file, replay_message
from adapters.servicebus.dlq.replay_copy import (
    REPLAY_COUNT,
    ReplayCopy,
    original_decision_time,
    original_message_id,
    replay_copy,
    replay_message_id,
)
from adapters.servicebus.dlq.selection import SKIP_LIMIT, ReplayFilter, Selection, choose, choose_exported

__all__ = [
    "KNOWN_REASONS",
    "REPLAY_COUNT",
    "SKIP_INTERRUPTED",
    "SKIP_LIMIT",
    "SKIP_NOT_RECEIVED",
    "DeadLetter",
    "Entity",
    "Outcome",
    "Patience",
    "ReplayCopy",
    "ReplayFilter",
    "Resubmitted",
    "Selection",
    "browse",
    "check_copy",
    "choose",
    "choose_exported",
    "dead_letter_active",
    "is_dropped",
    "original_decision_time",
    "original_message_id",
    "peek",
    "purge",
    "purge_exported",
    "replay",
    "replay_copy",
    "replay_from_file",
    "replay_message",
    "replay_message_id",
    "select",
]
