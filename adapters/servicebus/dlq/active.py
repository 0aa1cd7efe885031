"""``queue dead-letter``: move chosen active messages (by message id or sequence number) to the dead-letter queue."""

from __future__ import annotations

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiver

from adapters.servicebus.dlq.browse import browse
from adapters.servicebus.dlq.connection import Patience
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.dlq.holding import act_on_targets, settle_on_link
from adapters.servicebus.dlq.letter import OPERATOR_REASON
from adapters.servicebus.dlq.outcome import Outcome
from adapters.servicebus.dlq.selection import Selection


def dead_letter_active(
    client: ServiceBusClient,
    entity: Entity,
    *,
    message_id: str | None = None,
    sequence_number: int | None = None,
    reason: str = OPERATOR_REASON,
    description: str = "",
    max_wait: float = 2.0,
    patience: Patience = Patience(),
) -> Outcome:
    """Move chosen active messages (by message id or sequence number) to the dead-letter queue."""
    found = Selection()
    for letter in browse(client, entity, dead_letter=False, patience=patience):
        found.scanned += 1
        if (message_id is not None and letter.message_id == message_id) or (
            sequence_number is not None and letter.sequence_number == sequence_number
        ):
            found.matched.append(letter)
            found.targets.append(letter)
    outcome = Outcome(found)
    if not found.targets:
        return outcome

    def move(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> str | None:
        settle_on_link(receiver, message, "dead-letter", reason=reason, description=description)
        return None

    act_on_targets(client, entity, found, outcome, move, dead_letter=False, max_wait=max_wait, patience=patience)
    return outcome
