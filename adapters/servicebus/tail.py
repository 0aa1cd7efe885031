"""Reading a topic subscription: in the foreground (``ab-worker events tail``) or in the background (the demo).

A subscription is its reader's own copy of the topic: reading it consumes from that subscription
only, never from the topic or another subscription.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusReceiveMode
from azure.servicebus.exceptions import ServiceBusError

from adapters.servicebus.convert import message_body
from adapters.servicebus.errors import translated
from worker.service.redaction import redact

log = logging.getLogger(__name__)


class SubscriptionTail:
    """Reads a topic subscription in a background thread and hands each event body to ``on_event``."""

    def __init__(
        self, client: ServiceBusClient, topic_name: str, subscription: str, on_event: Callable[[bytes], object]
    ) -> None:
        self._client = client
        self.topic_name = topic_name
        self.subscription = subscription
        self._on_event = on_event
        self._stop = threading.Event()
        self._read = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="subscription-tail", daemon=True)
        self.received = 0

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def _run(self) -> None:
        with self._client.get_subscription_receiver(
            self.topic_name, self.subscription, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
        ) as receiver:
            while not self._stop.is_set():
                try:
                    messages = receiver.receive_messages(max_message_count=200, max_wait_time=0.5)
                except ServiceBusError as exc:
                    log.warning("Reading %s/%s failed: %s", self.topic_name, self.subscription, redact(str(exc)))
                    self._stop.wait(1.0)
                    continue
                for message in messages:
                    self._on_event(message_body(message))
                    with self._read:
                        self.received += 1
                        self._read.notify_all()

    def stop(self, expect: int = 0, timeout: float = 0.0) -> None:
        """Stop reading, once ``expect`` events were read or ``timeout`` seconds passed waiting for them.

        Waiting for a count, not for a fixed while: on a busy machine the last events of a run can
        take longer than any fixed pause to come back, and on an idle one they are there at once.
        """
        with self._read:
            self._read.wait_for(lambda: self.received >= expect, timeout)
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass(frozen=True, slots=True)
class TailedEvent:
    """One event read from a subscription: its body and the broker properties a reader shows or filters on."""

    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    enqueued_time: datetime | None = None
    application_properties: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: ServiceBusReceivedMessage) -> TailedEvent:
        """Decode a received message; never fails on an odd body or property."""
        return cls(
            body=message_body(message),
            message_id=_text(message.message_id),
            correlation_id=_text(message.correlation_id),
            enqueued_time=message.enqueued_time_utc,
            application_properties={
                str(_text(k)): _text(v) if isinstance(v, bytes) else v
                for k, v in (message.application_properties or {}).items()
            },
        )

    @property
    def event(self) -> dict[str, object]:
        """The body as a JSON object, or empty when it is not one."""
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def experiment_id(self) -> str | None:
        """The ``experiment_id`` application property (what subscription filters use), else the body's."""
        value = self.application_properties.get("experiment_id", self.event.get("experiment_id"))
        return None if value is None else str(value)


def read_events(
    client: ServiceBusClient,
    topic_name: str,
    subscription: str,
    *,
    keep: Callable[[TailedEvent], bool] = lambda event: True,
    limit: int | None = None,
    idle_seconds: float | None = None,
    on_open: Callable[[], None] = lambda: None,
) -> Iterator[TailedEvent]:
    """The events of ``topic_name``/``subscription`` as they arrive, until ``limit`` were kept or it stays idle.

    Each message is completed (consumed from this subscription) once the caller has it, so an event
    is handed over, or stays in the subscription, never lost in between; an event ``keep`` refuses is
    consumed unseen. Messages are received PEEK_LOCK, at most as many as ``limit`` still wants, so
    stopping early leaves the rest in the subscription. SDK errors are raised as ours. ``on_open`` is
    called once the receiver is open (the subscription exists and may be read).
    """
    kept = 0
    with (
        translated(f"reading {topic_name}/Subscriptions/{subscription}"),
        client.get_subscription_receiver(topic_name, subscription) as receiver,
    ):
        on_open()
        # Idle from the moment it can read: opening the link is not a quiet subscription.
        quiet_since = time.monotonic()
        while limit is None or kept < limit:
            wanted = 100 if limit is None else min(100, limit - kept)
            messages = receiver.receive_messages(max_message_count=wanted, max_wait_time=0.5)
            if messages:
                quiet_since = time.monotonic()
            elif idle_seconds is not None and time.monotonic() - quiet_since >= idle_seconds:
                return
            for message in messages:
                event = TailedEvent.from_message(message)
                if keep(event):
                    kept += 1
                    yield event
                receiver.complete_message(message)


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
