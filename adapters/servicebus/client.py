"""Connecting to a Service Bus namespace: a connection string, or a namespace and an Azure credential."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from azure.servicebus import ServiceBusClient

from adapters.servicebus.liveness import DEFAULT_TRY_TIMEOUT


@dataclass(frozen=True, slots=True)
class ServiceBusAuth:
    """How to reach the namespace: a connection string, or a namespace plus an Azure credential."""

    connection_string: str | None = None
    namespace: str | None = None

    def __repr__(self) -> str:
        # Never let the connection string reach a log line through a repr.
        secret = "***" if self.connection_string else None
        return f"ServiceBusAuth(namespace={self.namespace!r}, connection_string={secret})"


#: The SDK client the source and publisher share, named here so the composition root need not import the SDK.
Client = ServiceBusClient


def create_client(
    auth: ServiceBusAuth,
    *,
    retry_total: int = 3,
    retry_backoff_max: float = 10.0,
    try_timeout: float | None = DEFAULT_TRY_TIMEOUT,
) -> ServiceBusClient:
    """A ``ServiceBusClient`` from a connection string, or ``DefaultAzureCredential`` on a namespace.

    ``try_timeout`` bounds each SDK attempt (see :mod:`adapters.servicebus.liveness`): without it a
    send on a silent connection waits forever.
    """
    options: dict[str, Any] = {  # the SDK's own **kwargs: Any
        "retry_total": retry_total,
        "retry_backoff_factor": 0.5,
        "retry_backoff_max": retry_backoff_max,
    }
    if try_timeout is not None:
        options["try_timeout"] = try_timeout
    if auth.connection_string:
        return ServiceBusClient.from_connection_string(auth.connection_string, **options)
    if auth.namespace:
        from azure.identity import DefaultAzureCredential

        namespace = auth.namespace if "." in auth.namespace else f"{auth.namespace}.servicebus.windows.net"
        return ServiceBusClient(namespace, DefaultAzureCredential(), **options)
    raise ValueError(
        "Service Bus is not configured: set AB_WORKER_SERVICEBUS_CONNECTION_STRING or AB_WORKER_SERVICEBUS_NAMESPACE"
    )
