"""The real Azure Monitor exporter, configured by adapters.telemetry, against the App Insights stand-in.

Each scenario runs the pump in a subprocess (tests/integration/telemetry_worker.py): the distro
installs OpenTelemetry's global providers, which can be set once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters.local.standins.appinsights import AppInsightsStandIn
from adapters.telemetry import DISABLED_INSTRUMENTATIONS, configure_telemetry
from worker.domain.errors import ConfigurationError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 200


def run_worker(appinsights: AppInsightsStandIn, count: int = MESSAGES, *options: str) -> tuple[dict[str, Any], str]:
    """Run the pump in a fresh interpreter (warnings as errors); its JSON summary and its stderr."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("APPLICATIONINSIGHTS_", "OTEL_")) and key != "PYTHONWARNINGS"
    }
    env["APPLICATIONINSIGHTS_CONNECTION_STRING"] = appinsights.connection_string
    completed = subprocess.run(
        [sys.executable, "-W", "error", "-m", "tests.integration.telemetry_worker", str(count), *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def process_spans(appinsights: AppInsightsStandIn) -> list[dict[str, Any]]:
    """The request envelopes of the pump's CONSUMER spans."""
    return [
        e for e in appinsights.of_type("RequestData") if e["data"]["baseData"]["name"] == "assignment-requests process"
    ]


def test_consumer_spans_and_metrics_reach_app_insights(appinsights: AppInsightsStandIn) -> None:
    """Every message's CONSUMER span arrives as a request with the feature-flag properties; metrics too."""
    summary, stderr = run_worker(appinsights)

    assert summary["completed"] == MESSAGES
    assert summary["flushed"] is True
    spans = process_spans(appinsights)
    assert len(spans) == MESSAGES
    span = spans[0]
    assert span["name"] == "Microsoft.ApplicationInsights.Request"
    assert span["tags"]["ai.cloud.role"] == "ab-assignment-worker"
    assert span["tags"]["ai.operation.name"] == "assignment-requests process"
    assert span["data"]["baseData"]["success"] is True
    properties = span["data"]["baseData"]["properties"]
    assert properties["feature_flag.key"] == "exp_tone"
    assert properties["feature_flag.result.variant"] in {"A", "B"}
    assert properties["feature_flag.provider.name"] == "ab-assignment-worker"
    # The exporter treats messaging.* as standard attributes: it folds them into envelope fields
    # (type/target below) and leaves them out of customDimensions. Pinned so a change is noticed.
    assert not [key for key in properties if key.startswith("messaging.")]

    publishes = [
        e
        for e in appinsights.of_type("RemoteDependencyData")
        if e["data"]["baseData"]["name"] == "assignment-events publish"
    ]
    assert publishes
    assert publishes[0]["data"]["baseData"]["type"] == "Queue Message | servicebus"

    assert {"ab.assignments", "ab.processing.duration", "ab.batch.size"} <= appinsights.metric_names()
    assignments = [
        m for e in appinsights.metrics() for m in e["data"]["baseData"]["metrics"] if m["name"] == "ab.assignments"
    ]
    assert sum(m["value"] for m in assignments) == MESSAGES

    # Nothing but the ingestion endpoint was called (no live metrics, statsbeat, control plane or
    # instance metadata service): the only host the process connected to is the stand-in's.
    assert summary["connected_to"] == ["127.0.0.1"]
    assert {r.path.split("?")[0].lstrip("/") for r in appinsights.requests} == {"v2.1/track"}
    assert "Traceback" not in stderr


def test_raw_context_and_secrets_never_leave(appinsights: AppInsightsStandIn) -> None:
    """A personal context value reaches neither App Insights nor logs; the key only travels as iKey."""
    _, stderr = run_worker(appinsights, count=20)

    received = appinsights.raw_text()
    assert received
    assert "@example.com" not in received
    assert "email" not in received
    key = appinsights.instrumentation_key
    for envelope in appinsights.envelopes():
        assert envelope["iKey"] == key  # the one place the ingestion protocol requires it
        without_key = {k: v for k, v in envelope.items() if k != "iKey"}
        assert key not in json.dumps(without_key)
    assert key not in stderr
    assert "InstrumentationKey" not in stderr


@pytest.mark.parametrize("outage", ["down", "503", "hang"])
def test_outage_never_slows_or_stops_processing(appinsights: AppInsightsStandIn, outage: str) -> None:
    """Ingestion refused, failing or hanging for the whole run: every message completes, none waits on an export.

    Half the requests are processed after the exporter first tried the endpoint (a hung export never
    ends): an export on the pump's path would stop them. No socket is opened from the pump's threads.
    """
    if outage == "down":
        appinsights.down()
    elif outage == "503":
        appinsights.fail_with(503)
    else:
        appinsights.hang()

    summary, stderr = run_worker(appinsights, MESSAGES, "outage")

    assert summary["completed"] == MESSAGES
    assert summary["abandoned"] == 0
    assert summary["dead_letters"] == 0
    threads = summary["connecting_threads_while_running"]
    assert threads, "the exporter never tried the endpoint while the pump ran: nothing was proven"
    assert not [t for t in threads if t == "MainThread" or t.startswith("pump-")], threads
    # Shutdown keeps to its 5 s budget whatever the endpoint does (tests/unit/test_telemetry_shutdown.py
    # holds the budget itself); this guard only catches a shutdown that waited on the endpoint.
    assert summary["shutdown_seconds"] < 30
    assert process_spans(appinsights) == []
    assert appinsights.instrumentation_key not in stderr
    assert "Traceback" not in stderr


def test_console_and_none_modes_build_private_providers(capfd: pytest.CaptureFixture[str]) -> None:
    """console and none modes never touch the global providers and shut down cleanly."""
    from opentelemetry import trace

    global_provider = trace.get_tracer_provider()
    for mode in ("none", "console"):
        telemetry = configure_telemetry(mode)
        with telemetry.tracer_provider.get_tracer("test").start_as_current_span("unit of work"):
            pass
        assert telemetry.shutdown(timeout=30.0) is True  # a hang guard: flushing to the console is not timed
        assert trace.get_tracer_provider() is global_provider
    assert "unit of work" in capfd.readouterr().out


def test_appinsights_mode_needs_a_connection_string(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection string anywhere is a configuration error that names the variable, not a crash."""
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)
    with pytest.raises(ConfigurationError, match="APPLICATIONINSIGHTS_CONNECTION_STRING"):
        configure_telemetry("appinsights")
    with pytest.raises(ConfigurationError, match="unknown telemetry mode"):
        configure_telemetry("jaeger")  # type: ignore[arg-type]


def test_every_distro_instrumentation_is_disabled() -> None:
    """A distro upgrade that adds an auto-instrumentation must be added to the disabled list."""
    from azure.monitor.opentelemetry._constants import _ALL_SUPPORTED_INSTRUMENTED_LIBRARIES

    assert set(_ALL_SUPPORTED_INSTRUMENTED_LIBRARIES) <= set(DISABLED_INSTRUMENTATIONS)
