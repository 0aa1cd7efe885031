"""``GET /healthz`` (liveness) and ``GET /readyz`` (readiness) for Kubernetes and Container Apps probes.

Liveness fails only when the pump loop has stopped turning; readiness also fails while a dependency
(broker, event topic, record sink) is down or the worker is draining, so traffic and scale-in
decisions see the outage.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: (live, ready, detail), as returned by ``Pump.health``.
HealthCheck = Callable[[], tuple[bool, bool, str]]


class HealthServer:
    """A tiny HTTP server on its own thread; ``port=0`` picks a free port.

    Loopback by default, so a worker on a laptop or a shared host does not publish its state to the
    network; a pod sets ``AB_WORKER_HEALTH_HOST=0.0.0.0`` because the kubelet probes the pod's IP.
    """

    def __init__(self, check: HealthCheck, host: str = "127.0.0.1", port: int = 8080) -> None:
        self._check = check
        handler = _handler_for(check)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def address(self) -> str:
        """The bound address."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Serve in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def _handler_for(check: HealthCheck) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            live, ready, detail = check()
            if self.path == "/healthz":
                ok = live
            elif self.path == "/readyz":
                ok = live and ready
            else:
                self.send_error(404, "try /healthz or /readyz")
                return
            body = json.dumps({"status": "ok" if ok else "unavailable", "detail": detail}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Probes hit every few seconds; access logs would drown the worker's own.
            return

    return Handler
