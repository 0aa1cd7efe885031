"""The one signal helper: calls back while its block runs, and puts the previous handlers back."""

from __future__ import annotations

import signal
import threading

import pytest

from worker.service.signals import on_signals


def _previous(signum: int, frame: object) -> None:  # a handler some host installed before us
    raise AssertionError("the previous handler must not run while the block is active")


@pytest.fixture
def host_handlers():
    """SIGTERM and SIGINT set to a known handler before the test, and reset to what pytest had after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in saved:
        signal.signal(sig, _previous)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_signals_call_back_in_order_and_the_block_sees_them(host_handlers):
    """Each signal calls the callback with the signal; the block gets the list of those received."""
    calls: list[signal.Signals] = []
    with on_signals(calls.append) as received:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    assert calls == [signal.SIGTERM, signal.SIGINT]
    assert received == [signal.SIGTERM, signal.SIGINT]


def test_leaving_the_block_restores_the_previous_handlers(host_handlers):
    """After the block, the handlers installed before it are back, for every signal it took."""
    with on_signals(lambda sig: None):
        assert signal.getsignal(signal.SIGTERM) is not _previous
        assert signal.getsignal(signal.SIGINT) is not _previous
    assert signal.getsignal(signal.SIGTERM) is _previous
    assert signal.getsignal(signal.SIGINT) is _previous


def test_an_error_in_the_block_restores_the_previous_handlers_too(host_handlers):
    """A block that raises still puts the previous handlers back."""
    with pytest.raises(RuntimeError), on_signals(lambda sig: None):
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) is _previous
    assert signal.getsignal(signal.SIGINT) is _previous


def test_only_the_signals_asked_for_are_taken(host_handlers):
    """``signals=(SIGTERM,)`` leaves SIGINT's handler alone."""
    with on_signals(lambda sig: None, signals=(signal.SIGTERM,)):
        assert signal.getsignal(signal.SIGINT) is _previous
        assert signal.getsignal(signal.SIGTERM) is not _previous


def test_outside_the_main_thread_nothing_is_installed(host_handlers):
    """Handlers can only be installed from the main thread: elsewhere the block runs with none."""
    seen: list[object] = []

    def run() -> None:
        with on_signals(lambda sig: None) as received:
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(received)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [_previous, []]
