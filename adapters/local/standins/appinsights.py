"""A local stand-in for the Application Insights ingestion endpoint (``POST /v2.1/track``).

The Azure Monitor exporter posts a JSON array of envelopes (``application/json``; the classic SDKs'
newline-delimited JSON and gzip bodies are accepted too) and expects the Breeze answer
``{"itemsReceived": n, "itemsAccepted": n, "errors": []}``. Envelopes are kept for tests to read.

Point the exporter at it with :attr:`AppInsightsStandIn.connection_string`. Nothing here is a secret:
the instrumentation key is a made-up GUID.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any  # telemetry envelopes: JSON from the exporter, read by key in tests

from ._http import HttpStandIn, Request, Response

#: The made-up key of the stand-in's default connection string.
STANDIN_INSTRUMENTATION_KEY = "00000000-0000-0000-0000-000000000000"

Envelope = dict[str, Any]

_SPAN_TYPES = ("RequestData", "RemoteDependencyData")


def _parse_envelopes(body: bytes) -> list[Envelope]:
    text = body.decode("utf-8").strip()
    if not text:
        return []
    if text.startswith("["):
        parsed = json.loads(text)
        return [item for item in parsed if isinstance(item, dict)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class AppInsightsStandIn(HttpStandIn):
    """An HTTP server on 127.0.0.1 that accepts App Insights telemetry and keeps every envelope."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        instrumentation_key: str = STANDIN_INSTRUMENTATION_KEY,
    ) -> None:
        super().__init__(host, port)
        self.instrumentation_key = instrumentation_key
        self._envelopes: list[Envelope] = []

    @property
    def connection_string(self) -> str:
        """A connection string whose ingestion endpoint is this stand-in."""
        return f"InstrumentationKey={self.instrumentation_key};IngestionEndpoint={self.url}/"

    def handle(self, request: Request) -> Response:
        """Accept ``POST …/track``; anything else (live metrics, profiles) is a 404."""
        if request.method != "POST" or not request.path.split("?")[0].rstrip("/").endswith("/track"):
            return Response.json(404, {"error": "not an ingestion endpoint"})
        try:
            envelopes = _parse_envelopes(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Response.json(400, {"itemsReceived": 0, "itemsAccepted": 0, "errors": [{"message": str(exc)}]})
        with self._lock:
            self._envelopes.extend(envelopes)
        n = len(envelopes)
        return Response.json(200, {"itemsReceived": n, "itemsAccepted": n, "errors": []})

    # -- reading back --------------------------------------------------------------------

    def envelopes(self) -> list[Envelope]:
        """Every envelope received so far, in arrival order."""
        with self._lock:
            return list(self._envelopes)

    def of_type(self, *base_types: str) -> list[Envelope]:
        """Envelopes whose ``data.baseType`` is one of ``base_types``."""
        return [e for e in self.envelopes() if e.get("data", {}).get("baseType") in base_types]

    def spans(self) -> list[Envelope]:
        """Span envelopes: requests (SERVER/CONSUMER spans) and dependencies (the other kinds)."""
        return self.of_type(*_SPAN_TYPES)

    def metrics(self) -> list[Envelope]:
        """Metric envelopes."""
        return self.of_type("MetricData")

    def traces(self) -> list[Envelope]:
        """Log record envelopes."""
        return self.of_type("MessageData")

    def metric_names(self) -> set[str]:
        """Names of every metric point received."""
        return {m["name"] for e in self.metrics() for m in e["data"]["baseData"].get("metrics", [])}

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true; False on timeout."""
        return super().wait_for(predicate, timeout)

    def clear(self) -> None:
        """Forget what was received."""
        with self._lock:
            self._envelopes.clear()
            self.requests.clear()

    def raw_text(self) -> str:
        """Every request body received, decoded, for "this must appear nowhere" assertions."""
        with self._lock:
            return "\n".join(r.body.decode("utf-8", "replace") for r in self.requests)
