"""Azure Service Bus adapters: the request source (PEEK_LOCK receiver) and the event publisher.

SDK exceptions are translated into ours here, at the boundary: a failed receive or publish is a
:class:`~worker.domain.errors.TransientError` (the pump backs off and retries; the receiver is rebuilt so a
broker that went away is reconnected), and a settlement refused because the lock was lost or the
message was already settled is a :class:`~worker.service.ports.SettlementLostError` (logged and counted, never
fatal — the broker redelivers). Exception text is passed through :func:`worker.service.redaction.redact`.
"""

from adapters.servicebus.client import Client, ServiceBusAuth, create_client
from adapters.servicebus.convert import message_body, to_delivery, to_service_bus_message
from adapters.servicebus.lock import LockKeeper
from adapters.servicebus.publisher import RequestProperties, ServiceBusPublisher, reply_entity, send_requests
from adapters.servicebus.source import ServiceBusSource
from adapters.servicebus.tail import SubscriptionTail, TailedEvent, read_events

__all__ = [
    "Client",
    "LockKeeper",
    "RequestProperties",
    "ServiceBusAuth",
    "ServiceBusPublisher",
    "ServiceBusSource",
    "SubscriptionTail",
    "TailedEvent",
    "create_client",
    "message_body",
    "read_events",
    "reply_entity",
    "send_requests",
    "to_delivery",
    "to_service_bus_message",
]
