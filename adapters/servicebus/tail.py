"""Reading a topic subscription in the background (the demo's event viewer)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode
from azure.servicebus.exceptions import ServiceBusError

from adapters.servicebus.convert import message_body
from worker.service.redaction import redact

log = logging.getLogger(__name__)


class SubscriptionTail:
    """Reads a topic subscription in a background thread and hands each event body to ``on_event``."""

    def __init__(self, client: ServiceBusClient, topic_name: str, subscription: str, on_event: Any) -> None:
        self._client = client
        self.topic_name = topic_name
        self.subscription = subscription
        self._on_event = on_event
        self._stop = threading.Event()
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
                    self.received += 1
                    self._on_event(message_body(message))

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop reading, after ``drain_seconds`` more of reading what is left."""
        if drain_seconds:
            time.sleep(drain_seconds)
        self._stop.set()
        self._thread.join(timeout=10)
