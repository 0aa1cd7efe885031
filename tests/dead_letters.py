"""Dead letters for unit tests: each test names the fields it is about, the rest are plain."""

from __future__ import annotations

from typing import Any

from adapters.servicebus.dlq import DeadLetter

#: The fields every dead letter has, as plain as they come: what a test leaves out does not matter to it.
PLAIN: dict[str, Any] = {
    "sequence_number": 1,
    "enqueued_time": None,
    "delivery_count": 1,
    "reason": "UnknownExperiment",
    "description": "",
    "message_id": None,
    "correlation_id": None,
    "content_type": None,
    "body": b"{}",
}


def dead_letter(**fields: Any) -> DeadLetter:
    """A dead letter with these fields, the others as :data:`PLAIN` has them."""
    return DeadLetter(**{**PLAIN, **fields})
