"""KustoSink against an endpoint that accepts connections and never answers (a hung cluster or a
half-open connection): every flush fails as transient on time, and threads stay bounded (issue 10 E15)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from adapters.kusto.sink import RetryPolicy, kusto_sink
from tests.integration.test_kusto import DATABASE, record
from tests.waiting import wait_for
from worker.domain.errors import TransientError

pytestmark = pytest.mark.integration

FLUSHES = 8
ATTEMPTS = 3
#: Only a hang fails these bounds (the SDK's own timeouts wait 10.5 minutes); a busy machine does not.
HANG_GUARD = 60.0


class NeverAnswers:
    """A TCP listener on 127.0.0.1 that accepts every connection, reads, and never writes a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="never-answers", daemon=True)
        self.connections = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port``."""
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._held.append(connection)

    def __enter__(self) -> NeverAnswers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join(2)
        self._listener.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def never_answers() -> Iterator[NeverAnswers]:
    """The hung endpoint, closed after the test."""
    with NeverAnswers() as endpoint:
        yield endpoint


def ingest_threads() -> int:
    """Attempt threads alive now."""
    return sum(1 for thread in threading.enumerate() if thread.name == "kusto-ingest" and thread.is_alive())


def test_a_hung_endpoint_keeps_threads_bounded_and_attempts_time_out_for_real(never_answers: NeverAnswers) -> None:
    """8 flushes × 3 attempts into silence: each fails as transient, never more than one attempt thread."""
    retry = RetryPolicy(attempts=ATTEMPTS, base_delay=0.01, max_delay=0.01, attempt_timeout=0.3)
    sink = kusto_sink(never_answers.url, DATABASE, mode="streaming", retry=retry)
    peak = 0
    try:
        for i in range(FLUSHES):
            sink.add([record(i)])
            started = time.monotonic()
            with pytest.raises(TransientError, match=r"timed out|no answer"):
                sink.flush()
            assert time.monotonic() - started < HANG_GUARD, "a flush waited on the silent endpoint"
            peak = max(peak, ingest_threads())
        assert peak <= 1, f"{peak} attempt threads alive at once"
        # The transport's own timeout ends the last attempt shortly after its deadline: nothing is
        # left waiting on the dead endpoint (the old per-attempt threads waited 10.5 minutes).
        wait_for(lambda: ingest_threads() == 0, HANG_GUARD, "the last attempt thread to end")
        assert never_answers.connections >= FLUSHES  # the attempts really reached the endpoint
    finally:
        sink.close()
