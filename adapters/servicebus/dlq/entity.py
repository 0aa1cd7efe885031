"""The entity whose dead-letter queue (or active messages) a command acts on: a queue or a topic subscription."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entity:
    """A queue, or a topic subscription (``topic/Subscriptions/name``), whose DLQ we operate on."""

    queue: str | None = None
    topic: str | None = None
    subscription: str | None = None

    @classmethod
    def parse(cls, text: str) -> Entity:
        """``queue`` or ``topic/Subscriptions/sub`` (also ``topic/sub``)."""
        parts = [p for p in text.split("/") if p]
        if len(parts) == 1:
            return cls(queue=parts[0])
        if len(parts) == 3 and parts[1].lower() == "subscriptions":
            return cls(topic=parts[0], subscription=parts[2])
        if len(parts) == 2:
            return cls(topic=parts[0], subscription=parts[1])
        raise ValueError(f"entity {text!r}: expected QUEUE or TOPIC/Subscriptions/SUBSCRIPTION")

    def __str__(self) -> str:
        return self.queue or f"{self.topic}/Subscriptions/{self.subscription}"
