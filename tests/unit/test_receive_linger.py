"""The receive linger: a trickle must not pay the SDK's 0.2 s wait for a batch to fill."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient

from adapters.servicebus.source import DEFAULT_LINGER, ServiceBusSource, set_linger
from worker.service.settings import WorkerSettings

CONNECTION = "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"


def test_the_request_receiver_lingers_briefly_and_reads_in_short_slices() -> None:
    """The receiver waits DEFAULT_LINGER for more after the first message, and its reads wake that often."""
    with ServiceBusClient.from_connection_string(CONNECTION) as client:
        source = ServiceBusSource(client, "assignment-requests")
        receiver: Any = source._get_receiver()  # the receiver is built lazily; nothing connects here
        try:
            assert receiver._further_pull_receive_timeout == DEFAULT_LINGER
            assert receiver._further_pull_receive_timeout < 0.2
            assert receiver._config.socket_timeout == pytest.approx(max(0.01, DEFAULT_LINGER))
        finally:
            receiver.close()


def test_without_a_linger_the_sdk_defaults_stand() -> None:
    """linger=None leaves the SDK's 0.2 s and its socket timeout alone."""
    with ServiceBusClient.from_connection_string(CONNECTION) as client:
        receiver: Any = ServiceBusSource(client, "assignment-requests", linger=None)._get_receiver()
        try:
            assert receiver._further_pull_receive_timeout == pytest.approx(0.2)
        finally:
            receiver.close()


def test_an_sdk_without_the_attribute_gets_a_warning_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    """An SDK upgrade that renames the internal: receiving goes on at 0.2 s, with one WARNING."""

    class Receiver:
        pass

    with caplog.at_level(logging.WARNING):
        assert set_linger(Receiver(), 0.005) is False  # type: ignore[arg-type]
    assert "Receive linger not set" in caplog.text


def test_the_linger_is_a_setting() -> None:
    """AB_WORKER_RECEIVE_LINGER, 0 to 1 s."""
    assert WorkerSettings().receive_linger == DEFAULT_LINGER
    assert WorkerSettings(receive_linger=0.05).receive_linger == 0.05
    with pytest.raises(ValueError, match="receive_linger"):
        WorkerSettings(receive_linger=2)
