"""Every project logger reaches Application Insights, through redaction (issue 10 E14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters.local.standins.appinsights import AppInsightsStandIn

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("FAKE-SB-KEY-1234", "FAKE-SAS-SIG-5678")


def run_logs(appinsights: AppInsightsStandIn) -> tuple[dict[str, Any], str]:
    """Run tests/integration/telemetry_logs.py against the stand-in; its summary and stderr."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("APPLICATIONINSIGHTS_", "OTEL_")) and key != "PYTHONWARNINGS"
    }
    env["APPLICATIONINSIGHTS_CONNECTION_STRING"] = appinsights.connection_string
    completed = subprocess.run(
        [sys.executable, "-W", "error", "-m", "tests.integration.telemetry_logs"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def test_adapter_cli_and_service_logs_reach_app_insights_redacted(appinsights: AppInsightsStandIn) -> None:
    """adapters.*, the CLI and worker.* at INFO+ arrive as traces/exceptions; no secret, no DEBUG."""
    summary, stderr = run_logs(appinsights)
    assert summary["flushed"] is True

    logged = appinsights.of_type("MessageData", "ExceptionData")
    by_logger: dict[str, list[str]] = {}
    for envelope in logged:
        data = envelope["data"]["baseData"]
        text = data.get("message") or json.dumps(data.get("exceptions"))
        by_logger.setdefault(data["properties"].get("logger_name", ""), []).append(text)
    assert any("lock renewal failed" in t for t in by_logger.get("adapters.servicebus", [])), by_logger
    assert any("settlement fallback" in t for t in by_logger.get("adapters.servicebus", [])), by_logger
    assert any("cli line" in t for t in by_logger.get(summary["cli_logger"], [])), by_logger
    assert any("record sink is back" in t for t in by_logger.get("worker.service.pump", [])), by_logger

    exceptions = appinsights.of_type("ExceptionData")
    assert len(exceptions) == 1
    (details,) = exceptions[0]["data"]["baseData"]["exceptions"]
    assert details["typeName"] == "ConnectionError"
    assert "sig=***" in details["stack"]

    received = appinsights.raw_text()
    for secret in SECRETS:
        assert secret not in received
        assert secret not in stderr
    assert "SharedAccessKey=***" in received
    assert "FAKE-DEBUG-LINE" not in received
