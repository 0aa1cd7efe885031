"""The composition root: the one place that picks adapters and wires them to the pump.

Nothing else in ``worker/`` imports ``adapters/``. Everything here is called from the command line
(:mod:`worker.cli`); nothing connects, reads the environment or starts a thread at import time.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.domain.errors import ConfigurationError
from worker.service.pump import PumpConfig
from worker.service.redaction import redact
from worker.service.settings import WorkerSettings

if TYPE_CHECKING:
    from adapters.local.broker import LocalBroker

log = logging.getLogger(__name__)


def pump_config(settings: WorkerSettings, max_batch: int | None = None) -> PumpConfig:
    """The pump's tuning from the settings (flags already applied)."""
    return PumpConfig(
        queue_name=settings.queue_name,
        topic_name=settings.topic_name,
        max_batch=max_batch or settings.max_batch,
        max_wait=settings.max_wait,
        max_body_bytes=settings.max_body_bytes,
        context_allow_list=frozenset(settings.context_allow_list),
        drain_deadline=settings.drain_deadline,
    )


@dataclass
class Ports:
    """The three ports the pump drives, plus what must be closed with them."""

    source: Any
    publisher: Any
    sink: Any
    client: Any = None


def servicebus_connection_string(settings: WorkerSettings) -> str | None:
    """The configured connection string (a secret: never log it)."""
    secret = settings.servicebus_connection_string
    return secret.get_secret_value() if secret is not None else None


def servicebus_client(settings: WorkerSettings) -> Any:
    """A ``ServiceBusClient`` from the settings."""
    from adapters.servicebus import ServiceBusAuth, create_client

    auth = ServiceBusAuth(servicebus_connection_string(settings), settings.servicebus_namespace)
    try:
        return create_client(auth)
    except ValueError as exc:
        raise ConfigurationError(
            f"AB_WORKER_SERVICEBUS_CONNECTION_STRING / AB_WORKER_SERVICEBUS_NAMESPACE is not usable: {redact(str(exc))}"
        ) from None


def record_sink(settings: WorkerSettings, rows_path: str | None) -> Any:
    """Kusto when configured, else a JSON-lines rows file (or nothing but a count)."""
    if settings.kusto_ingest_uri:
        from adapters.kusto.sink import RetryPolicy, kusto_sink

        return kusto_sink(
            settings.kusto_ingest_uri,
            settings.kusto_database,
            settings.kusto_table,
            mode=settings.kusto_mode,
            max_rows=settings.kusto_max_rows,
            max_age=settings.flush_max_age,
            retry=RetryPolicy(attempts=settings.kusto_flush_attempts, attempt_timeout=settings.kusto_attempt_timeout),
        )
    from adapters.files import JsonLinesSink

    if rows_path is None:
        log.warning("No Kusto configured (AB_WORKER_KUSTO_INGEST_URI) and no --rows file: rows are not recorded")
    return JsonLinesSink(Path(rows_path) if rows_path else None, max_age=settings.flush_max_age)


def servicebus_ports(settings: WorkerSettings, rows_path: str | None) -> Ports:
    """Source and publisher on Service Bus; the sink from :func:`record_sink`."""
    from adapters.servicebus import ServiceBusPublisher, ServiceBusSource

    client = servicebus_client(settings)
    source = ServiceBusSource(client, settings.queue_name, prefetch=settings.prefetch)
    publisher = ServiceBusPublisher(client, settings.topic_name)
    return Ports(source, publisher, record_sink(settings, rows_path), client)


@contextmanager
def local_broker(port: int = 0, config_path: str | None = None) -> Iterator[LocalBroker]:
    """The embedded broker on 127.0.0.1, stopped on exit."""
    try:
        from adapters.local.broker import BrokerConfig, LocalBroker
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"--local needs the embedded broker, which is development tooling and not installed here ({exc.name} is"
            " missing): from a source checkout, `make install` or `pip install -e '.[local]'`"
        ) from None

    config = BrokerConfig.load(config_path) if config_path else None
    broker = LocalBroker(config, port=port)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def telemetry(settings: WorkerSettings) -> Iterator[tuple[Any, Any]]:
    """(tracer provider, meter provider) for the chosen telemetry mode; flushed and shut down on exit."""
    mode = settings.telemetry
    connection = settings.applicationinsights_connection_string
    if mode == "none" and connection is not None:
        mode = "appinsights"
    if mode == "none":
        yield None, None
        return
    from adapters.telemetry import configure_telemetry

    handle = configure_telemetry(
        mode,
        connection.get_secret_value() if connection else None,
        sampling_ratio=settings.telemetry_sampling_ratio,
    )
    try:
        yield handle.tracer_provider, handle.meter_provider
    finally:
        handle.shutdown()


def start_health_server(port: int, check: Any, stack: ExitStack, host: str = "127.0.0.1") -> int | None:
    """Serve /healthz and /readyz on ``host:port`` (port 0: off); a busy port is logged, not fatal."""
    if not port:
        return None
    from adapters.health import HealthServer

    try:
        server = HealthServer(check, host=host, port=port).start()
    except OSError as exc:
        log.warning(
            "Health endpoints not served: %s:%d unavailable (%s); set AB_WORKER_HEALTH_HOST / AB_WORKER_HEALTH_PORT",
            host,
            port,
            exc,
        )
        return None
    stack.callback(server.stop)
    return server.port


def print_err(message: str) -> None:
    """A line for the operator on stderr."""
    print(message, file=sys.stderr, flush=True)
