"""The /healthz and /readyz probe endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from adapters.health import HealthServer


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if error.headers.get("Content-Type") == "application/json" else {}


@pytest.mark.parametrize(
    ("state", "healthz", "readyz"),
    [
        ((True, True, "ok"), 200, 200),
        ((True, False, "event topic down: timeout"), 200, 503),
        ((False, False, "loop stalled"), 503, 503),
    ],
)
def test_probes_follow_pump_health(state, healthz, readyz):
    """Liveness follows the loop; readiness also follows dependencies; the detail is reported."""
    server = HealthServer(lambda: state, host="127.0.0.1", port=0).start()
    try:
        assert _get(server.port, "/healthz")[0] == healthz
        status, body = _get(server.port, "/readyz")
        assert status == readyz
        assert body["detail"] == state[2]
        assert _get(server.port, "/other")[0] == 404
    finally:
        server.stop()
