"""Settlement helpers shared by the adapters that implement ``MessageSource``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from worker.service.ports import Delivery, SettlementLostError

log = logging.getLogger(__name__)


def complete_each(complete: Callable[[Delivery], None], deliveries: Sequence[Delivery]) -> list[Delivery]:
    """``complete_batch`` for sources that settle one message at a time: the deliveries whose lock was lost."""
    lost: list[Delivery] = []
    for delivery in deliveries:
        try:
            complete(delivery)
        except SettlementLostError as exc:
            log.info("Message %s was not completed: %s", delivery.message_id, exc)
            lost.append(delivery)
    return lost
