"""OpenTelemetry setup: Application Insights through the Azure Monitor distro, the console, or nothing.

What reaches Application Insights, and what telemetry costs the worker, is in the manual
(``docs/operations.md``, "Telemetry"); this docstring says how. The core only uses the
OpenTelemetry API with injected providers; this module builds them.
:func:`configure_telemetry` returns a :class:`Telemetry` holding a tracer provider and a meter
provider for :class:`worker.service.pump.Pump`, and a bounded :meth:`Telemetry.shutdown`.

Modes
-----
``appinsights``
    ``azure.monitor.opentelemetry.configure_azure_monitor`` with the given connection string (else
    the distro reads ``APPLICATIONINSIGHTS_CONNECTION_STRING``). **The distro cannot be handed
    providers**: it builds its own tracer, meter and logger providers and installs them as the
    OpenTelemetry *globals* (``set_tracer_provider`` …, which the API allows once per process). So
    this mode is once per process; :class:`Telemetry` returns those global providers, and a second
    call raises :class:`~worker.domain.errors.ConfigurationError`. Log records of every project
    logger tree (:data:`PROJECT_LOGGERS`) are exported through :func:`redacted_copy` first.
``console``
    The SDK's console exporters (spans in batches, metrics every ``export_interval_s``). No globals.
``none``
    No-op providers: nothing is recorded and nothing leaves the process. No globals.

What ``appinsights`` turns off, and why
---------------------------------------
Everything that would call the network by itself, or instrument our own HTTP calls:

* ``enable_live_metrics=False`` — Live Metrics (QuickPulse) polls a Microsoft endpoint every second.
* ``enable_performance_counters=False`` — process/CPU counters we do not use.
* ``browser_sdk_loader_config={"enabled": False}`` — injects JavaScript into web responses; no web here.
* ``instrumentation_options`` with every library the distro knows set to ``{"enabled": False}``:
  ``azure_sdk``, ``django``, ``fastapi``, ``flask``, ``httpx``, ``httpx2``, ``psycopg2``,
  ``requests``, ``urllib``, ``urllib3``. The Kusto SDK talks over ``requests`` and the storage and
  Service Bus SDKs over azure-core; instrumenting them would add a span per HTTP call and per
  AMQP operation next to our own spans (and ``azure_sdk`` would also swap azure-core's global tracing
  implementation).
* Environment, set with ``os.environ.setdefault`` (an operator's explicit value wins) because the
  exporter reads them lazily, not from arguments:

  - ``APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL=true`` — statsbeat: the SDK's own usage metrics,
    sent to a Microsoft-owned App Insights resource.
  - ``APPLICATIONINSIGHTS_SDKSTATS_DISABLED=true`` — "customer SDK stats": counts of dropped and
    retried items, sent as extra metrics to *our* resource; we do not want them mixed into ours.
  - ``APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED=true`` — the "OneSettings" control plane, a
    background poller of a Microsoft configuration endpoint that can toggle SDK features remotely.
  - ``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS=otel`` — the distro otherwise enables the ``azure_vm``
    detector, which calls the instance metadata service (169.254.169.254) at start-up, and the
    ``azure_app_service`` detector. ``otel`` only reads ``OTEL_SERVICE_NAME`` /
    ``OTEL_RESOURCE_ATTRIBUTES``.

Best effort: a slow or unreachable ingestion endpoint never slows processing. Spans are queued by a
``BatchSpanProcessor`` and metrics read by a ``PeriodicExportingMetricReader``, both exporting from
background threads; HTTP calls use ``export_timeout_s`` (connect and read) and no in-pipeline retries
(``retry_total=0``), and offline storage (the distro's on-disk retry queue, by default under the temp
directory in a folder named after the instrumentation key) is off unless ``offline_storage_dir`` is
given. A full span queue drops spans rather than block. :meth:`Telemetry.shutdown` flushes and shuts
down within ``timeout`` seconds whatever the endpoint does.

Sampling: the distro's default is a rate-limited sampler (5 traces per second). Pass
``sampling_ratio`` (0–1, fixed percentage) to change it; ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG`` still override both, as the distro documents.

Secrets: the connection string is never logged nor put in an exception message by this module.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Literal

from opentelemetry import metrics, trace

from worker.domain.errors import ConfigurationError
from worker.service.redaction import redact

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)

TelemetryMode = Literal["appinsights", "console", "none"]

#: Every auto-instrumentation the distro (1.8.x) knows; all are turned off (see the module docs).
DISABLED_INSTRUMENTATIONS = (
    "azure_sdk",
    "django",
    "fastapi",
    "flask",
    "httpx",
    "httpx2",
    "psycopg2",
    "requests",
    "urllib",
    "urllib3",
)

#: Environment the exporter reads lazily; set with ``setdefault`` so an operator's value wins.
NETWORK_OFF_ENVIRONMENT = {
    "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    "APPLICATIONINSIGHTS_SDKSTATS_DISABLED": "true",
    "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
    "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel",
}

#: The logger trees whose records go to Application Insights (everything the project logs).
PROJECT_LOGGERS = ("worker", "adapters", "schemas")

_CONNECTION_STRING_ENV = "APPLICATIONINSIGHTS_CONNECTION_STRING"
_configured_lock = threading.Lock()
_appinsights_configured = False


@dataclass
class Telemetry:
    """The providers to inject into the pump, and how to flush and stop them."""

    mode: TelemetryMode
    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    _closers: list[Callable[[float], None]] = field(default_factory=list, repr=False)
    _closed: bool = field(default=False, repr=False)

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush and shut down every provider within ``timeout`` seconds; False if that ran out.

        Runs in a daemon thread so a hung exporter cannot keep the worker from exiting.
        """
        if self._closed or not self._closers:
            self._closed = True
            return True
        self._closed = True
        done = threading.Event()

        def close_all() -> None:
            try:
                for closer in self._closers:
                    closer(timeout)
            except Exception:  # telemetry is best effort: never fail the worker's shutdown
                log.warning("Telemetry shutdown failed", exc_info=True)
            finally:
                done.set()

        threading.Thread(target=close_all, name="telemetry-shutdown", daemon=True).start()
        finished = done.wait(timeout)
        if not finished:
            log.warning("Telemetry did not flush within %.1f s; unsent telemetry is dropped", timeout)
        return finished


def configure_telemetry(
    mode: TelemetryMode,
    connection_string: str | None = None,
    *,
    service_name: str = "ab-assignment-worker",
    export_interval_s: float = 5.0,
    export_timeout_s: float = 5.0,
    sampling_ratio: float | None = None,
    offline_storage_dir: str | None = None,
    logger_names: Sequence[str] = PROJECT_LOGGERS,
    console_out: IO[str] | None = None,
) -> Telemetry:
    """Build the providers for ``mode`` (see the module docs for what each mode does and turns off).

    ``console_out`` is where ``console`` writes (default: the current standard output).

    ``appinsights`` needs a connection string (argument or ``APPLICATIONINSIGHTS_CONNECTION_STRING``)
    and may be called once per process. Raises :class:`~worker.domain.errors.ConfigurationError` for an
    unknown mode, a missing connection string or a second ``appinsights`` call.
    """
    if mode == "none":
        return Telemetry("none", trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())
    if mode == "console":
        return _console(service_name, export_interval_s, console_out or sys.stdout)
    if mode == "appinsights":
        return _appinsights(
            connection_string,
            service_name=service_name,
            export_interval_s=export_interval_s,
            export_timeout_s=export_timeout_s,
            sampling_ratio=sampling_ratio,
            offline_storage_dir=offline_storage_dir,
            logger_names=logger_names,
        )
    raise ConfigurationError(f"unknown telemetry mode {mode!r}; expected appinsights, console or none")


def _resource(service_name: str) -> Resource:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    return Resource.create({SERVICE_NAME: service_name})


def _console(service_name: str, export_interval_s: float, out: IO[str]) -> Telemetry:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = _resource(service_name)
    tracer_provider = TracerProvider(resource=resource)
    # The exporters' default ``out`` is bound to sys.stdout at import time; the caller passes the current
    # stream, so output follows any redirection made since (and tests' captured streams).
    tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=out)))
    reader = PeriodicExportingMetricReader(
        ConsoleMetricExporter(out=out), export_interval_millis=max(1.0, export_interval_s * 1000)
    )
    meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
    return Telemetry(
        "console",
        tracer_provider,
        meter_provider,
        [_sdk_closer(tracer_provider, meter_provider)],
    )


def _sdk_closer(tracer_provider: Any, meter_provider: Any, logger_provider: Any = None) -> Callable[[float], None]:
    # Any: the SDK providers the console path built, or whatever the distro installed globally (the API
    # getters type them as the API's providers, which have no flush or shutdown): duck-typed on purpose.
    def close(timeout: float) -> None:
        millis = max(1, int(timeout * 1000))
        tracer_provider.force_flush(millis)
        tracer_provider.shutdown()
        meter_provider.shutdown(timeout_millis=millis)
        if logger_provider is not None:
            logger_provider.force_flush(millis)
            logger_provider.shutdown()

    return close


@contextmanager
def _scoped_environment(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` while the distro reads them at construction, then restore the environment."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _appinsights(
    connection_string: str | None,
    *,
    service_name: str,
    export_interval_s: float,
    export_timeout_s: float,
    sampling_ratio: float | None,
    offline_storage_dir: str | None,
    logger_names: Sequence[str],
) -> Telemetry:
    global _appinsights_configured  # noqa: PLW0603 — the distro's providers are process globals
    connection_string = connection_string or os.environ.get(_CONNECTION_STRING_ENV)
    if not connection_string:
        raise ConfigurationError(
            f"telemetry mode appinsights needs a connection string ({_CONNECTION_STRING_ENV} is not set)"
        )
    if sampling_ratio is not None and not 0.0 <= sampling_ratio <= 1.0:
        raise ConfigurationError(f"sampling ratio must be between 0 and 1, got {sampling_ratio}")
    with _configured_lock:
        if _appinsights_configured:
            raise ConfigurationError(
                "Application Insights telemetry is already configured in this process "
                "(the Azure Monitor distro installs global providers, once per process)"
            )
        _appinsights_configured = True

    for name, value in NETWORK_OFF_ENVIRONMENT.items():
        os.environ.setdefault(name, value)

    from azure.monitor.opentelemetry import configure_azure_monitor

    options: dict[str, Any] = {  # configure_azure_monitor's **kwargs: Any
        "connection_string": connection_string,
        "resource": _resource(service_name),
        "logger_name": logger_names[0],
        "enable_live_metrics": False,
        "enable_performance_counters": False,
        "browser_sdk_loader_config": {"enabled": False},
        "instrumentation_options": {name: {"enabled": False} for name in DISABLED_INSTRUMENTATIONS},
        # Exporter and azure-core pipeline settings, passed through by the distro:
        "timeout": export_timeout_s,
        "read_timeout": export_timeout_s,
        "retry_total": 0,
    }
    if offline_storage_dir is None:
        options["disable_offline_storage"] = True
    else:
        options["storage_directory"] = offline_storage_dir
    if sampling_ratio is not None:
        options["sampling_ratio"] = sampling_ratio

    first_logger = logging.getLogger(logger_names[0])
    handlers_before = list(first_logger.handlers)
    # The distro's PeriodicExportingMetricReader takes its interval from the environment only.
    with _scoped_environment({"OTEL_METRIC_EXPORT_INTERVAL": str(max(1, int(export_interval_s * 1000)))}):
        try:
            configure_azure_monitor(**options)
        except ValueError as exc:
            # The distro rejects malformed connection strings with ValueError; keep its words, not our secret.
            raise ConfigurationError(f"invalid Application Insights configuration: {redact(str(exc))}") from None

    from opentelemetry import _logs

    tracer_provider = trace.get_tracer_provider()
    meter_provider = metrics.get_meter_provider()
    logger_provider = _logs.get_logger_provider()
    exporters = [h for h in first_logger.handlers if h not in handlers_before]
    detach = _export_project_logs(exporters, logger_names)
    closer = _sdk_closer(
        tracer_provider,
        meter_provider,
        logger_provider if hasattr(logger_provider, "shutdown") else None,
    )
    return Telemetry("appinsights", tracer_provider, meter_provider, [lambda _timeout: detach(), closer])


def _export_project_logs(exporters: list[logging.Handler], logger_names: Sequence[str]) -> Callable[[], None]:
    """Move the distro's log handler(s) behind redaction onto every project logger; returns the undo."""
    if not exporters:
        log.warning("The Azure Monitor distro attached no log handler: project logs are not exported")
        return lambda: None
    wrapped = [_RedactedExport(handler) for handler in exporters]
    loggers = [logging.getLogger(name) for name in logger_names]
    for handler in exporters:
        loggers[0].removeHandler(handler)
    for logger in loggers:
        for handler in wrapped:
            logger.addHandler(handler)

    def detach() -> None:
        for logger in loggers:
            for handler in wrapped:
                logger.removeHandler(handler)

    return detach


#: Attributes every LogRecord has; anything else came in through ``extra=`` and may carry text.
_STANDARD_RECORD_KEYS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redacted_copy(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` safe to export: message, extras and exception text through ``redact``.

    The exception is handed on as the OpenTelemetry ``exception.*`` attributes (redacted) instead of
    ``exc_info``, because the exporter would otherwise format the live exception itself.
    """
    copy = logging.makeLogRecord(dict(vars(record)))
    copy.msg, copy.args = redact(record.getMessage()), None
    for key, value in vars(record).items():
        if key not in _STANDARD_RECORD_KEYS and isinstance(value, str):
            setattr(copy, key, redact(value))
    if record.exc_info and record.exc_info[0] is not None:
        kind, value, trace_back = record.exc_info
        vars(copy).update(
            {
                "exception.type": kind.__name__,
                "exception.message": redact(str(value)),
                "exception.stacktrace": redact("".join(traceback.format_exception(kind, value, trace_back))),
            }
        )
    copy.exc_info, copy.exc_text = None, None
    return copy


class _RedactedExport(logging.Handler):
    """Hands the exporter's handler a :func:`redacted_copy` of each record, never the record itself."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__()
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        """Export a redacted copy (the console handlers still get the original, redacted by their filter)."""
        self.inner.handle(redacted_copy(record))

    def flush(self) -> None:
        """Flush the exporter's handler."""
        self.inner.flush()

    def close(self) -> None:
        """Close the exporter's handler."""
        self.inner.close()
        super().close()
