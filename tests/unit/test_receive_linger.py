"""The receive linger and window (AB_WORKER_RECEIVE_LINGER, AB_WORKER_RECEIVE_WINDOW): on by default,
applied to the receiver, safe when the SDK changes. Their effect on real receives is in
tests/integration/test_receive_gather.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient

from adapters.servicebus.internals import GUARDS, receive_linger, set_receive_linger
from adapters.servicebus.source import ServiceBusSource
from worker.service.settings import WorkerSettings

CONNECTION = "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"


def test_a_linger_shortens_the_wait_and_slices_the_reads() -> None:
    """With a linger the receiver waits that long for more after a message, reading in slices as short."""
    with ServiceBusClient.from_connection_string(CONNECTION) as client:
        receiver: Any = ServiceBusSource(client, "assignment-requests", linger=0.005)._get_receiver()
        try:  # the receiver is built lazily; nothing connects here
            assert receive_linger(receiver) == 0.005
            assert receiver._config.socket_timeout == pytest.approx(0.005)
        finally:
            receiver.close()


def test_without_a_linger_the_sdk_defaults_stand() -> None:
    """A source built without a linger (library use) leaves the SDK's 0.2 s wait and socket timeout alone."""
    with ServiceBusClient.from_connection_string(CONNECTION) as client:
        source = ServiceBusSource(client, "assignment-requests", window=5.0)
        receiver: Any = source._get_receiver()
        try:
            assert receive_linger(receiver) == pytest.approx(0.2)
            assert receiver._config.socket_timeout == pytest.approx(0.2)
            assert source.window == 0.0  # gathering needs a linger
        finally:
            receiver.close()


def test_an_sdk_without_the_attribute_gets_a_warning_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    """An SDK upgrade that renames the internal: receiving goes on at 0.2 s, with one WARNING."""

    class Receiver:
        pass

    GUARDS.reset()
    with caplog.at_level(logging.WARNING):
        renamed: Any = Receiver()  # an SDK receiver without the private attribute
        assert set_receive_linger(renamed, 0.05) is False
    assert "receive linger is off" in caplog.text
    assert "receives wait the SDK's 0.2 s" in caplog.text
    GUARDS.reset()


def test_the_linger_and_window_are_settings_with_bounds() -> None:
    """2 ms and 20 ms by default (chosen from bench_latency and bench_throughput); bounded when set."""
    settings = WorkerSettings()
    assert (settings.receive_linger, settings.receive_window) == (0.002, 0.02)
    assert WorkerSettings(receive_linger=0.05, receive_window=0).receive_window == 0
    for bad in ({"receive_linger": 0}, {"receive_linger": 2}, {"receive_window": -1}, {"receive_window": 1.5}):
        with pytest.raises(ValueError, match="receive_"):
            WorkerSettings(**bad)
