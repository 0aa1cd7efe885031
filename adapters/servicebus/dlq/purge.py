"""``dlq purge``: delete chosen dead letters for good (complete them in the dead-letter queue).

Chosen by a filter, or (``purge --from``) exactly the dead letters an export file names, as
:func:`~adapters.servicebus.dlq.selection.choose_exported` decides.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiver

from adapters.servicebus.dlq.browse import browse, select
from adapters.servicebus.dlq.connection import Patience
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.dlq.holding import act_on_targets, settle_on_link
from adapters.servicebus.dlq.letter import DeadLetter
from adapters.servicebus.dlq.outcome import Outcome, go_ahead
from adapters.servicebus.dlq.selection import ReplayFilter, Selection, choose_exported


def purge(
    client: ServiceBusClient,
    entity: Entity,
    selection: ReplayFilter,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    confirm: Callable[[Selection], bool] | None = None,
    max_wait: float = 2.0,
    patience: Patience = Patience(),
    stop: threading.Event | None = None,
) -> Outcome:
    """Delete matching dead letters for good (complete them in the DLQ); ``stop`` ends it between two."""
    found = select(client, entity, selection, limit=limit, patience=patience)
    return _purge_found(
        client, entity, found, dry_run=dry_run, confirm=confirm, max_wait=max_wait, patience=patience, stop=stop
    )


def purge_exported(
    client: ServiceBusClient,
    entity: Entity,
    exported: Sequence[DeadLetter],
    *,
    dry_run: bool = False,
    confirm: Callable[[Selection], bool] | None = None,
    max_wait: float = 2.0,
    patience: Patience = Patience(),
    stop: threading.Event | None = None,
) -> Outcome:
    """Delete exactly the dead letters an export file names (after ``replay --from`` sent their repaired copies).

    Each line names one dead letter by sequence number and message id, and it is deleted only if its
    body is still the one exported; :attr:`Selection.not_found` lists the lines naming none.
    """
    found = choose_exported(browse(client, entity, patience=patience), exported)
    return _purge_found(
        client, entity, found, dry_run=dry_run, confirm=confirm, max_wait=max_wait, patience=patience, stop=stop
    )


def _purge_found(
    client: ServiceBusClient,
    entity: Entity,
    found: Selection,
    *,
    dry_run: bool,
    confirm: Callable[[Selection], bool] | None,
    max_wait: float,
    patience: Patience,
    stop: threading.Event | None,
) -> Outcome:
    """Delete what ``found`` targets, once the dry run, the confirmation and ``stop`` let it go ahead."""
    outcome = Outcome(found, skipped=list(found.skipped))
    if not go_ahead(found, outcome, dry_run, confirm, stop):
        return outcome
    act_on_targets(client, entity, found, outcome, _delete, max_wait=max_wait, patience=patience, stop=stop)
    return outcome


def _delete(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
    settle_on_link(receiver, message, "complete")
    return None
