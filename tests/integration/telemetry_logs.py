"""Logs from every part of the project with Application Insights on, in a process of its own (for
test_telemetry_logs): the distro installs global providers, once per process.

Usage: ``APPLICATIONINSIGHTS_CONNECTION_STRING=… python -m tests.integration.telemetry_logs``.
Each line carries a fake secret that must be redacted before it leaves the process.
"""

from __future__ import annotations

import json
import logging
import sys

from adapters.telemetry import configure_telemetry
from worker.cli import run as cli
from worker.service.redaction import install_log_redaction

CONNECTION = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=FAKE-SB-KEY-1234="


def main() -> int:
    """Log as the adapters, the CLI and the service do; print the logger names used."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    install_log_redaction()
    # Generous budgets: on a busy machine a flush that ran out would drop the logs the test looks for.
    telemetry = configure_telemetry("appinsights", export_interval_s=0.5, export_timeout_s=10.0)
    logging.getLogger("adapters.servicebus").warning("lock renewal failed for m1 via %s", CONNECTION)
    logging.getLogger("adapters.servicebus").info("settlement fallback: one by one (range refused)")
    cli.log.warning("cli line: replaying with %s", CONNECTION)
    try:
        raise ConnectionError("upload to https://acct.blob.core.windows.net/c/b?sv=2024&sig=FAKE-SAS-SIG-5678 failed")
    except ConnectionError:
        logging.getLogger("adapters.kusto.sink").exception("Kusto ingestion failed")
    logging.getLogger("worker.service.pump").info("record sink is back; resuming")
    logging.getLogger("worker.service.pump").debug("below the level: FAKE-DEBUG-LINE")
    flushed = telemetry.shutdown(timeout=30.0)
    print(json.dumps({"flushed": flushed, "cli_logger": cli.log.name}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
