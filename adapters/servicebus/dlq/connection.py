"""Connections to an entity, and riding out their drops.

Every command opens its receivers and senders here, and rides out a dropped connection by opening a
new one and going on; :class:`Patience` says how long it keeps trying while nothing gets done.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusReceiveMode,
    ServiceBusReceiver,
    ServiceBusSender,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageSizeExceededError,
    OperationTimeoutError,
    ServiceBusCommunicationError,
    ServiceBusConnectionError,
    ServiceBusError,
    ServiceBusServerBusyError,
)

from adapters.sdk_guards import SdkSurfaceMissing
from adapters.servicebus.dlq.entity import Entity
from adapters.servicebus.internals import stop_keep_alive
from worker.domain.errors import TransientError
from worker.service.redaction import redact

log = logging.getLogger(__name__)


def open_receiver(client: ServiceBusClient, entity: Entity, *, dead_letter: bool = True) -> ServiceBusReceiver:
    """A PEEK_LOCK receiver on ``entity``'s dead-letter sub-queue (or, with ``dead_letter=False``, on it).

    It starts no SDK keep-alive thread (:func:`~adapters.servicebus.internals.stop_keep_alive`): that
    thread reads the connection beside the command's own calls and its lock keeper's renewals, and a
    dead letter handed on with another's delivery tag is dropped by the SDK, its lock left to lapse.
    """
    sub_queue = ServiceBusSubQueue.DEAD_LETTER if dead_letter else None
    mode = ServiceBusReceiveMode.PEEK_LOCK
    if entity.queue:
        receiver = client.get_queue_receiver(entity.queue, sub_queue=sub_queue, receive_mode=mode)
    elif entity.topic and entity.subscription:
        receiver = client.get_subscription_receiver(
            entity.topic, entity.subscription, sub_queue=sub_queue, receive_mode=mode
        )
    else:
        raise ValueError(f"entity {entity}: neither a queue nor a topic subscription")
    with contextlib.suppress(SdkSurfaceMissing):  # the guard said so: the SDK's thread reads too
        stop_keep_alive(receiver)
    return receiver


def open_sender(client: ServiceBusClient, entity: Entity) -> ServiceBusSender:
    """A sender to where ``entity``'s dead letters go back: the queue, or a subscription's topic."""
    # A subscription's dead letters go back through its topic, tagged with the subscription, since
    # Service Bus cannot send to one subscription; docs/operations.md gives the subscription rule.
    if entity.queue:
        return client.get_queue_sender(entity.queue)
    if not entity.topic:
        raise ValueError(f"entity {entity}: neither a queue nor a topic subscription")
    return client.get_topic_sender(entity.topic)


class ConnectionDropped(Exception):
    """The connection under a receiver or sender dropped mid-operation: reconnect and go on."""


def is_dropped(exc: BaseException) -> bool:
    """True for what the SDK raises when a connection breaks under a call (after its own retries).

    A handler the SDK shut down after a connection error raises a plain ``ValueError`` ("the handler
    has already been shutdown"); ``AttributeError``/``TypeError`` come from a handler torn down
    under a concurrent call (the lock keeper's renewals), bare or wrapped by the SDK in a plain
    ``ServiceBusError`` ("Handler failed: …"). ``MessageAlreadySettled`` and
    ``MessageSizeExceededError`` are value errors too, but about a message, not the connection.
    """
    if isinstance(exc, MessageAlreadySettled | MessageSizeExceededError):
        return False
    if type(exc) is ServiceBusError and isinstance(exc.inner_exception, AttributeError | TypeError | ValueError):
        # The SDK's wrapper ("Handler failed: …") for a handler torn down under a concurrent call.
        return True
    return isinstance(
        exc,
        ConnectionDropped
        | ServiceBusConnectionError
        | ServiceBusCommunicationError
        | OperationTimeoutError
        | ServiceBusServerBusyError
        | OSError
        | ValueError
        | AttributeError
        | TypeError,
    )


@dataclass(frozen=True)
class Patience:
    """How many reconnects in a row, without any progress between them, before a command gives up.

    Waits ``first`` seconds before the first reconnect, doubling up to ``most``; any message
    received or settled in between starts the count again, so a run makes its way through
    connections that keep dropping as long as each one gets something done.
    """

    attempts: int = 6
    first: float = 0.5
    most: float = 8.0

    def wait(self, failures: int) -> None:
        """Sleep before reconnect number ``failures`` (1-based)."""
        time.sleep(min(self.most, self.first * 2 ** max(0, failures - 1)))

    def exhausted(self, failures: int) -> bool:
        """True once ``failures`` reconnects in a row got nothing done."""
        return failures > self.attempts


def gave_up(what: str, failures: int, exc: BaseException) -> TransientError:
    """The error a command ends with when the connection kept dropping without anything getting done."""
    return TransientError(
        f"{what}: the connection dropped {failures} times in a row without getting anything done; "
        f"last: {type(exc).__name__}: {redact(str(exc))}"
    )


def close_quietly(handler: Any) -> None:
    """Close a receiver or sender, ignoring what a broken connection makes its close raise."""
    try:
        handler.close()
    except Exception as exc:  # a handler on a broken connection may fail to close; it is dropped anyway
        log.debug("Ignoring error while closing a broken handler: %s", redact(str(exc)))
