"""The HTTP stand-ins' shared server: a client that leaves before its answer is normal, not a traceback."""

from __future__ import annotations

import socket
import struct

import pytest

from adapters.local.standins._http import HttpStandIn, Request, Response
from tests.waiting import wait_for

REQUEST = b"POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"


class Answering(HttpStandIn):
    """Answers every request with a small JSON body."""

    def handle(self, request: Request) -> Response:
        return Response.json(200, {"ok": True})


def _reset_on_close(sock: socket.socket) -> None:
    # SO_LINGER 0: close() sends a TCP reset at once, as a client whose read timed out and was torn down.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_client_that_leaves_before_its_answer_is_counted_not_printed(capfd: pytest.CaptureFixture[str]) -> None:
    """The answer to a client that has gone is dropped and counted; no BrokenPipeError traceback is printed."""
    with Answering() as server:
        server.slow(60)
        client = socket.create_connection((server.host, server.port))
        client.sendall(REQUEST)
        wait_for(lambda: len(server.requests) == 1, what="the stand-in to receive the request")
        _reset_on_close(client)
        client.close()
        server.recover()  # releases the held answer, which now meets a closed connection
        wait_for(lambda: server.undelivered == 1, what="the answer to be dropped")
        # The server goes on serving the next client.
        with socket.create_connection((server.host, server.port)) as again:
            again.sendall(REQUEST)
            assert again.recv(65536).startswith(b"HTTP/1.1 200")
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert "BrokenPipeError" not in err
    assert "ConnectionResetError" not in err


def test_recover_sends_the_answers_slow_was_holding() -> None:
    """A request held by slow() is answered as soon as recover() is called, not after the whole delay."""
    with Answering() as server:
        server.slow(600)
        with socket.create_connection((server.host, server.port)) as client:
            client.sendall(REQUEST)
            wait_for(lambda: len(server.requests) == 1, what="the stand-in to receive the request")
            server.recover()
            client.settimeout(30)
            assert client.recv(65536).startswith(b"HTTP/1.1 200")
