"""``dlq purge``: delete chosen dead letters for good (complete them in the dead-letter queue)."""

from __future__ import annotations

from collections.abc import Callable

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiver

from adapters.servicebus.dlq.browse import select
from adapters.servicebus.dlq.connection import Patience
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.dlq.holding import act_on_targets, settle_on_link
from adapters.servicebus.dlq.outcome import Outcome, go_ahead
from adapters.servicebus.dlq.selection import ReplayFilter, Selection


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
) -> Outcome:
    """Delete matching dead letters for good (complete them in the DLQ)."""
    found = select(client, entity, selection, limit=limit, patience=patience)
    outcome = Outcome(found, skipped=list(found.skipped))
    if not go_ahead(found, outcome, dry_run, confirm):
        return outcome

    def delete(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
        settle_on_link(receiver, message, lambda: receiver.complete_message(message))
        return None

    act_on_targets(client, entity, found, outcome, delete, max_wait=max_wait, patience=patience)
    return outcome
