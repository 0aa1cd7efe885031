"""A small threaded HTTP server on 127.0.0.1 with outage switches, shared by the HTTP stand-ins.

Each stand-in subclasses :class:`HttpStandIn` and implements :meth:`HttpStandIn.handle`. The
switches act on every request: ``fail_with(status)`` answers with an error, ``slow(seconds)`` delays
the answer, ``hang()`` holds it until ``recover()``, ``down()`` closes the listening socket
(connections are refused, as for a host that is gone) and ``recover()`` undoes them all, re-binding
the same port and sending the answers held.
A client that leaves before its answer is written is counted (``undelivered``), not printed.
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self  # Any: socketserver's and http.server's own override signatures


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the stand-in received it (body already decompressed)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Response:
    """What :meth:`HttpStandIn.handle` answers."""

    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"

    @classmethod
    def json(cls, status: int, payload: object) -> Response:
        """A JSON answer."""
        return cls(status, json.dumps(payload).encode())


def decode_body(raw: bytes, encoding: str | None) -> bytes:
    """Undo ``Content-Encoding`` (gzip or deflate); other encodings are returned as sent."""
    encoding = (encoding or "").lower()
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "deflate":
        return zlib.decompress(raw)
    return raw


#: What a socket raises when the client went away before the answer was written.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    standin: HttpStandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that stops waiting (its read timeout, a test that is done) is normal for an HTTP
        # server: count it instead of printing socketserver's traceback into the test output.
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_GONE):
            self.standin.client_gone()
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request to stderr; tests read the recorded requests instead.
        return

    def _serve(self) -> None:
        raw = self._read_body()
        request = Request(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=decode_body(raw, self.headers.get("Content-Encoding")),
        )
        response = self.server.standin.dispatch(request)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_POST = do_GET = do_PUT = _serve


class HttpStandIn:
    """Base of the HTTP stand-ins: lifecycle, request log and outage switches."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._failure_status: int | None = None
        #: Seconds each answer is held back; None holds it until :meth:`recover` (see :meth:`hang`).
        self._delay: float | None = 0.0
        #: Set by :meth:`recover` (and :meth:`stop`): answers held by :meth:`slow` or :meth:`hang` go out at once.
        self._released = threading.Event()
        self.requests: list[Request] = []
        #: Answers not delivered because the client had gone (closed or reset its connection).
        self.undelivered = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a background thread; returns self."""
        server = _Server((self.host, self._port or self._requested_port), _Handler)
        server.standin = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent); answers held by :meth:`slow` go out now."""
        self._released.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (known after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    # -- outage switches -----------------------------------------------------------------

    def fail_with(self, status: int) -> None:
        """Answer every request with ``status`` until :meth:`recover`."""
        self._failure_status = status

    def slow(self, seconds: float) -> None:
        """Delay every answer by ``seconds``, or until :meth:`recover` releases the ones held."""
        self._released.clear()
        self._delay = seconds

    def hang(self) -> None:
        """Accept and read every request but answer none until :meth:`recover`, as a hung host does.

        The caller's own timeouts are the only way out, so a test can prove they fire without
        racing a delay against them; :meth:`recover` then lets the held requests finish.
        """
        self._released.clear()
        self._delay = None

    def down(self) -> None:
        """Close the listening socket: connections are refused until :meth:`recover`."""
        self.stop()

    def recover(self) -> None:
        """Undo :meth:`fail_with`, :meth:`slow`, :meth:`hang` and :meth:`down` (re-binding the same port)."""
        self._failure_status = None
        self._delay = 0.0
        self._released.set()
        if self._server is None and self._port is not None:
            self.start()

    # -- requests ------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        """Record the request, apply the switches, then :meth:`handle` it."""
        with self._changed:
            self.requests.append(request)
        if self._delay is None or self._delay > 0:
            self._released.wait(self._delay)
        if self._failure_status is not None:
            return Response.json(self._failure_status, {"error": {"code": "ServiceUnavailable", "@permanent": False}})
        try:
            response = self.handle(request)
        except Exception as exc:  # a stand-in bug must show up as a 500, not a dropped connection
            response = Response.json(500, {"error": {"code": "StandInError", "message": repr(exc)}})
        with self._changed:
            self._changed.notify_all()
        return response

    def handle(self, request: Request) -> Response:
        """Answer one request; subclasses implement the protocol."""
        raise NotImplementedError

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true (re-checked after every request); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Re-check at least every 50 ms: background loops change state outside dispatch too.
                self._changed.wait(min(remaining, 0.05))
        return True

    def client_gone(self) -> None:
        """An answer could not be written: the client had closed its connection."""
        with self._changed:
            self.undelivered += 1
            self._changed.notify_all()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
