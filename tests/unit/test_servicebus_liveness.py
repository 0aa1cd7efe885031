"""The silence bounds of the Service Bus adapter, without a broker: watchdog and quiet-receiver bookkeeping."""

from __future__ import annotations

import logging
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
from azure.servicebus.exceptions import OperationTimeoutError

from adapters.servicebus import liveness
from adapters.servicebus.internals import GUARDS
from adapters.servicebus.liveness import Liveness, SilenceWatch, SilentConnectionError, Watchdog, abort_connection
from tests.waiting import wait_for


def sdk_shaped(sock: socket.socket | None) -> Any:
    """An object shaped like an SDK sender/receiver down to its socket (``_handler._connection._transport.sock``).

    Any: it goes where the SDK's receiver is expected, as the watchdog reads it: by its private attributes.
    """
    transport = SimpleNamespace(sock=sock)
    return SimpleNamespace(_handler=SimpleNamespace(_connection=SimpleNamespace(_transport=transport)))


def test_watchdog_wakes_a_call_blocked_on_a_silent_socket() -> None:
    """A recv that would block forever returns once the deadline passes: the watchdog shut the socket down."""
    ours, peer = socket.socketpair()
    watchdog = Watchdog(repeat=0.2, interval=0.02)
    ours.settimeout(30)  # a guard: without the watchdog the recv fails with a timeout instead of hanging
    try:
        started = time.monotonic()
        with watchdog.deadline(0.2, sdk_shaped(ours)):
            data = ours.recv(10)  # the peer never writes
        took = time.monotonic() - started
    finally:
        watchdog.close()
        ours.close()
        peer.close()
    assert data == b""
    assert watchdog.aborts == 1
    assert took >= 0.15  # not before its deadline (armed after ``started``: only ever later on a busy machine)


def test_watchdog_leaves_calls_within_their_deadline_alone() -> None:
    """A call that finishes in time is never aborted, and its socket keeps working."""
    ours, peer = socket.socketpair()
    watchdog = Watchdog(repeat=0.2, interval=0.02)
    try:
        with watchdog.deadline(60.0, sdk_shaped(ours)):  # in time, however busy the machine
            peer.sendall(b"hi")
            assert ours.recv(10) == b"hi"
        time.sleep(0.1)
        peer.sendall(b"again")
        assert ours.recv(10) == b"again"
    finally:
        watchdog.close()
        ours.close()
        peer.close()
    assert watchdog.aborts == 0


class Unrecognisable:
    """An SDK object without the internals the watchdog reads; counts how often it was looked into."""

    def __init__(self) -> None:
        self.looked = 0

    def __getattr__(self, name: str) -> object:
        self.looked += 1
        raise AttributeError(name)


def test_an_sdk_without_the_expected_internals_is_reported_not_crashed(caplog: pytest.LogCaptureFixture) -> None:
    """If the SDK's private attributes move, nothing is aborted, the watchdog says so once and so does the guard."""
    GUARDS.reset()
    watchdog = Watchdog(repeat=0.05, interval=0.02)
    owner: Any = Unrecognisable()  # an SDK object whose internals moved
    with caplog.at_level(logging.WARNING), watchdog.deadline(0.05, owner):
        # Until the watchdog has tried three times (not for 0.3 s and hope it ran): one warning, not three.
        wait_for(lambda: owner.looked >= 3, what="three abort attempts")
    watchdog.close()
    assert watchdog.aborts == 0
    nothing: Any = object()  # no _handler at all
    assert abort_connection(nothing) is False
    assert abort_connection(sdk_shaped(None)) is False
    assert [r.message for r in caplog.records].count(
        "A Service Bus call outlived its deadline and its connection could not be aborted"
    ) == 1
    assert GUARDS.tripped == {"connection socket"}
    GUARDS.reset()


def test_silence_watch_is_due_only_after_quiet_for_probe_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hearing from the connection resets the clock; the budget adds two try-timeouts to a call's wait."""
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(liveness, "time", SimpleNamespace(monotonic=lambda: clock.now))
    watch = SilenceWatch(Liveness(try_timeout=1.5, probe_after=0.5))
    clock.now += 0.25
    assert not watch.due()
    clock.now += 0.25
    assert watch.due()
    watch.heard()
    assert not watch.due()
    clock.now += 0.5
    assert watch.due()
    assert watch.budget(2.0) == 5.0
    watch.watchdog.close()


class CrowdedReceiver:
    """A receiver whose peek times out while another request on its connection (a renewal) is answered."""

    def __init__(self, watch: SilenceWatch, answered_meanwhile: bool) -> None:
        self.watch, self.answered_meanwhile = watch, answered_meanwhile

    def peek_messages(self, max_message_count: int, timeout: float) -> list[object]:
        if self.answered_meanwhile:
            self.watch.heard()  # what the source does when a renewal on this connection succeeds
        raise OperationTimeoutError(message="Operation timed out.")


def test_a_peek_timing_out_while_the_connection_answers_other_requests_is_not_silence() -> None:
    """Issue 16 §2: a management link busy answering renewals is alive; a connection that answered nothing is silent."""
    watch = SilenceWatch(Liveness(try_timeout=1.0, probe_after=0.1))
    try:
        watch.check(CrowdedReceiver(watch, answered_meanwhile=True))  # type: ignore[arg-type]
        assert (watch.silences, watch.crowded) == (0, 1)
        with pytest.raises(SilentConnectionError):
            watch.check(CrowdedReceiver(watch, answered_meanwhile=False))  # type: ignore[arg-type]
        assert watch.silences == 1
    finally:
        watch.watchdog.close()
