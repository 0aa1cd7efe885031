"""The composition root: the one place that picks adapters and wires them to the pump.

:func:`bootstrap` builds a ready :class:`~worker.service.pump.Pump` from the settings; every port can
be overridden (cosmicpython's ``bootstrap(start_orm=..., uow=...)`` shape), which is how the command
line, the integration tests and the benchmarks all build their pumps. The other functions build what
each command needs from the same settings (:func:`environment_settings`, the Service Bus client, the
file ports of ``run --input``, the report's Kusto query, the embedded broker), and
:class:`ExperimentRegistry` is the public registry with ``load(path)``. It sits beside the layers it
wires, not inside one of them (as cosmicpython's ``bootstrap.py`` sits outside ``service_layer/``):
the command line imports it; it imports the adapters, the service and the domain; none of those
imports it (the layers contract in ``pyproject.toml``). Nothing connects, reads the environment or
starts a thread at import time.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Self

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider
from pydantic import ValidationError

from worker.domain import registry as model
from worker.domain.errors import ConfigurationError, UsageError
from worker.domain.srm.tally import Tally
from worker.service.observe import Logging, PumpObserver, Telemetry
from worker.service.ports import EventPublisher, ExperimentSource, MessageSource, RecordSink
from worker.service.pump import Pump, PumpConfig
from worker.service.redaction import redact
from worker.service.settings import WorkerSettings
from worker.service.signals import on_signals

if TYPE_CHECKING:
    from adapters.experiments import ReloadingRegistry
    from adapters.health import HealthCheck
    from adapters.local.broker import LocalBroker
    from adapters.servicebus import Client as ServiceBusClient
    from adapters.servicebus.liveness import Liveness

log = logging.getLogger(__name__)


# --- settings -------------------------------------------------------------------------------------


def environment_settings() -> WorkerSettings:
    """The settings from the ``AB_WORKER_*`` environment (called by a command, never at import).

    A bad value is a :class:`ConfigurationError` with one line per variable, named as the user set it.
    Flags go over these with :meth:`WorkerSettings.with_overrides`, which returns a new object.
    """
    try:
        return WorkerSettings()
    except ValidationError as exc:
        raise ConfigurationError(_settings_problem(exc)) from None


def _settings_problem(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        name = "_".join(str(p) for p in error["loc"]).upper()
        name = name if name.startswith("AB_WORKER_") else "AB_WORKER_" + name  # aliases carry the prefix
        lines.append(f"environment variable {name}: {error['msg']}")
    return "\n".join(lines)


# --- the pump -------------------------------------------------------------------------------------


def bootstrap(
    settings: WorkerSettings | None = None,
    *,
    registry: ExperimentSource | None = None,
    source: MessageSource | None = None,
    publisher: EventPublisher | None = None,
    sink: RecordSink | None = None,
    client: ServiceBusClient | None = None,
    rows_path: str | None = None,
    config: PumpConfig | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    observers: Sequence[PumpObserver] = (),
    clock: Callable[[], float] = time.monotonic,
) -> Pump:
    """A ready pump: each port given is used as is, each one missing is built from ``settings``.

    ``settings`` defaults to the defaults (the environment is read only by the caller, with
    :func:`environment_settings`). The registry reloads ``settings.experiments_file``; source and publisher
    are Service Bus on ``client`` (built from the settings when not given, and then closed with the
    pump); the sink is Kusto when configured, else the ``rows_path`` JSON-lines file. ``config``
    replaces the tuning the settings give (:func:`pump_config`).
    """
    settings = settings or WorkerSettings.model_construct()
    resources: list[Callable[[], object]] = []
    if (source is None or publisher is None) and client is None:
        client = servicebus_client(settings)
        resources.append(client.close)
    if source is None or publisher is None:
        assert client is not None  # built above when not given
        source = source or servicebus_source(settings, client)
        publisher = publisher or servicebus_publisher(settings, client)
    config = config or pump_config(settings)
    registry = registry or experiments(settings)
    _count_reload_failures(registry, meter_provider)
    return Pump(
        source,
        publisher,
        sink if sink is not None else record_sink(settings, rows_path),
        registry,
        config=config,
        observers=[
            Logging(),
            Telemetry(config.queue_name, config.topic_name, tracer_provider, meter_provider),
            *observers,
        ],
        resources=resources,
        clock=clock,
    )


def servicebus_source(settings: WorkerSettings, client: ServiceBusClient) -> MessageSource:
    """The requests queue on Service Bus (PEEK_LOCK, ``settings.prefetch``, locks renewed while held)."""
    from adapters.servicebus import ServiceBusSource

    return ServiceBusSource(
        client,
        settings.queue_name,
        prefetch=settings.prefetch,
        liveness=liveness(settings),
        linger=settings.receive_linger,
        window=settings.receive_window,
    )


def servicebus_publisher(settings: WorkerSettings, client: ServiceBusClient) -> EventPublisher:
    """The events topic on Service Bus (and reply entities named by ``reply_to``)."""
    from adapters.servicebus import ServiceBusPublisher

    return ServiceBusPublisher(
        client, settings.topic_name, requests_queue=settings.queue_name, liveness=liveness(settings)
    )


def liveness(settings: WorkerSettings) -> Liveness:
    """How long a silent (half-open) Service Bus connection may go unnoticed."""
    from adapters.servicebus.liveness import Liveness

    return Liveness(try_timeout=settings.servicebus_try_timeout, probe_after=settings.servicebus_probe_after)


# --- experiments ----------------------------------------------------------------------------------


def experiments(settings: WorkerSettings) -> ReloadingRegistry:
    """The registry of ``settings.experiments_file``, reloaded when the file changes (call it for the current one)."""
    from adapters.experiments import ReloadingRegistry

    if not settings.experiments_file:
        raise UsageError("no experiments: pass --config FILE or set AB_WORKER_EXPERIMENTS_FILE")
    return ReloadingRegistry(settings.experiments_file, interval=settings.reload_interval)


def _count_reload_failures(registry: ExperimentSource, meter_provider: MeterProvider | None) -> None:
    """A reloading experiments file counts the reloads it did not apply with the pump's meter provider.

    The file is read (and refused when broken) before telemetry is set up, so the meter is handed to
    it here, where the two meet.
    """
    from adapters.experiments import ReloadingRegistry

    if isinstance(registry, ReloadingRegistry):
        registry.count_in(meter_provider)


class ExperimentRegistry(model.ExperimentRegistry):
    """The experiment registry of the public API, with :meth:`load` (``from worker import ExperimentRegistry``).

    The model is the domain's and reads no file; ``load`` joins it to the file adapter here, in the
    composition root, the one layer allowed to know both. A subclass rather than a function so that
    ``ExperimentRegistry.load(path)``, the call users and the allocation contract name, keeps working
    and returns an instance of the class it was called on.
    """

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read and validate a YAML or JSON registry file; errors name the file, experiment and field."""
        from adapters.experiments import read_document

        return cls.from_dict(read_document(Path(path)), str(path))


# --- the pump's ports and tuning ------------------------------------------------------------------


def pump_config(settings: WorkerSettings) -> PumpConfig:
    """The pump's tuning from the settings (flags already applied)."""
    return PumpConfig(
        queue_name=settings.queue_name,
        topic_name=settings.topic_name,
        max_batch=settings.max_batch,
        max_wait=settings.max_wait,
        max_body_bytes=settings.max_body_bytes,
        context_allow_list=frozenset(settings.context_allow_list),
        drain_deadline=settings.drain_deadline,
        liveness_timeout=settings.liveness_timeout,
    )


@contextmanager
def stop_on_signals(
    pump: Pump, deadline: float, exit_now: Callable[[int], object] = os._exit
) -> Iterator[list[signal.Signals]]:
    """While in the block, SIGTERM / SIGINT stop the pump, and end the process once ``deadline`` seconds have passed.

    A graceful stop finishes the in-flight batch, abandons what an outage holds (released for another
    replica) and flushes. A dependency call that does not return (a hung endpoint) must not keep the
    process past the deadline the platform grants: the timer then ends it with status 1, and the
    held messages come back to the queue when the connection closes or their locks lapse. Leaving the
    block cancels the timer and restores the previous handlers (:func:`~worker.service.signals.on_signals`).
    The block gets the list of the signals received (the CLI exits 130 after a Ctrl-C).
    """
    timers: list[threading.Timer] = []

    def overrun() -> None:
        log.error(
            "Drain deadline of %.1fs passed with the pump still busy; exiting now (held messages are redelivered)",
            deadline,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        exit_now(1)

    def stop(received: signal.Signals) -> None:
        log.warning("Received %s: finishing the in-flight batch, then exiting", received.name)
        if not timers:
            timer = threading.Timer(deadline, overrun)
            timer.daemon = True
            timers.append(timer)
            timer.start()
        pump.stop()

    try:
        with on_signals(stop) as received:
            yield received
    finally:
        for timer in timers:
            timer.cancel()


def servicebus_connection_string(settings: WorkerSettings) -> str | None:
    """The configured connection string (a secret: never log it)."""
    secret = settings.servicebus_connection_string
    return secret.get_secret_value() if secret is not None else None


def require_servicebus(settings: WorkerSettings, alternatives: Sequence[str] = ()) -> None:
    """A :class:`UsageError` when neither a connection string nor a namespace is configured.

    ``alternatives`` are what the command offers instead (``--local for the embedded broker``).
    """
    if settings.servicebus_connection_string is not None or settings.servicebus_namespace is not None:
        return
    offered = "".join(f", or use {alternative}" for alternative in alternatives)
    raise UsageError(
        "no Service Bus: set AB_WORKER_SERVICEBUS_CONNECTION_STRING (e.g. the one `ab-worker broker` prints) "
        f"or AB_WORKER_SERVICEBUS_NAMESPACE{offered}"
    )


def servicebus_client(settings: WorkerSettings, alternatives: Sequence[str] = ()) -> ServiceBusClient:
    """A ``ServiceBusClient`` from the settings (:func:`require_servicebus` first)."""
    from adapters.servicebus import ServiceBusAuth, create_client

    require_servicebus(settings, alternatives)
    auth = ServiceBusAuth(servicebus_connection_string(settings), settings.servicebus_namespace)
    try:
        return create_client(auth, try_timeout=settings.servicebus_try_timeout)
    except ValueError as exc:
        raise ConfigurationError(
            f"AB_WORKER_SERVICEBUS_CONNECTION_STRING / AB_WORKER_SERVICEBUS_NAMESPACE is not usable: {redact(str(exc))}"
        ) from None


def record_sink(settings: WorkerSettings, rows_path: str | None) -> RecordSink:
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


@contextmanager
def telemetry(
    settings: WorkerSettings, console_out: IO[str] | None = None
) -> Iterator[tuple[TracerProvider | None, MeterProvider | None]]:
    """(tracer provider, meter provider) for the chosen telemetry mode; flushed and shut down on exit.

    ``console_out``: where the ``console`` mode writes (standard output unless given).
    """
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
        console_out=console_out,
    )
    try:
        yield handle.tracer_provider, handle.meter_provider
    finally:
        handle.shutdown()


def start_health_server(settings: WorkerSettings, check: HealthCheck, stack: ExitStack) -> int | None:
    """Serve /healthz and /readyz on the settings' host and port (port 0: off) until ``stack`` closes.

    A busy port is logged, not fatal: the work goes on without probes.
    """
    host, port = settings.health_host, settings.health_port
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


# --- the commands' other ports --------------------------------------------------------------------


def file_ports(
    settings: WorkerSettings,
    requests: Path,
    events: IO[str],
    dead_letters: IO[str],
    rows_path: str | None,
) -> tuple[MessageSource, EventPublisher, RecordSink]:
    """``run --input``: requests read from a JSON-lines file, events and dead letters written to streams.

    Rows go to the ``rows_path`` JSON-lines file (or are only counted), whatever the Kusto settings.
    """
    from adapters.files import JsonLinesPublisher, JsonLinesSink, JsonLinesSource

    source = JsonLinesSource(requests, dead_letter_stream=dead_letters)
    sink = JsonLinesSink(Path(rows_path) if rows_path else None, max_age=settings.flush_max_age)
    return source, JsonLinesPublisher(events), sink


def dead_letter_copies(stream: IO[str]) -> PumpObserver:
    """``run --dead-letters`` on a broker: each request dead-lettered is also written to ``stream`` as a JSON line."""
    from adapters.files import DeadLetterCopies

    return DeadLetterCopies(stream)


def assignment_counts(settings: WorkerSettings) -> Callable[[Tally], str]:
    """``report --kusto``: what fills a tally from ``AssignmentEventsDedup()``, returning where it read.

    The cluster is ``settings.kusto_query_uri`` (the caller checks it is set), the database
    ``settings.kusto_database``. A query the cluster refuses raises the adapter's ``KustoQueryError``.
    """
    from adapters.kusto.query import fill_tally

    query_uri, database = str(settings.kusto_query_uri), settings.kusto_database

    def fill(tally: Tally) -> str:
        fill_tally(query_uri, database, tally)
        return f"Kusto {query_uri} database {database}"

    return fill


@contextmanager
def local_broker(port: int = 0, host: str = "127.0.0.1", config: Path | None = None) -> Iterator[LocalBroker]:
    """The embedded Service Bus broker, started on ``host:port`` and stopped on exit (``--local``, ``broker``).

    ``config`` is an entities file in the official emulator's Config.json shape (a bad one is a
    :class:`UsageError`); an ``OSError`` from listening is the caller's to name the flag in.
    """
    embedded = _embedded_broker()
    try:
        entities = embedded.BrokerConfig.load(config) if config else embedded.BrokerConfig.default()
    except embedded.BrokerConfigError as exc:
        raise UsageError(str(exc)) from None
    broker = embedded.LocalBroker(entities, host=host, port=port).start()
    try:
        yield broker
    finally:
        broker.stop()


def _embedded_broker() -> ModuleType:
    """The embedded broker's package; a one-line error where it is not installed (the image)."""
    try:
        return importlib.import_module("adapters.local.broker")
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"--local needs the embedded broker (so does `broker`), which is development tooling and not installed"
            f" here ({exc.name} is missing): from a source checkout, `make install` or `pip install -e '.[local]'`"
        ) from None
