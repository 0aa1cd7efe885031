"""The receive linger (AB_WORKER_RECEIVE_LINGER): off by default, applied when set, safe when the SDK changes."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient

from adapters.servicebus.source import MIN_READ_SLICE, ServiceBusSource, set_linger
from worker.service.settings import WorkerSettings

CONNECTION = "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"


def test_a_set_linger_shortens_the_wait_and_slices_the_reads() -> None:
    """With a linger the receiver waits that long for more after the first message, reading in short slices."""
    with ServiceBusClient.from_connection_string(CONNECTION) as client:
        receiver: Any = ServiceBusSource(client, "assignment-requests", linger=0.005)._get_receiver()
        try:  # the receiver is built lazily; nothing connects here
            assert receiver._further_pull_receive_timeout == 0.005
            assert receiver._config.socket_timeout == pytest.approx(MIN_READ_SLICE)
        finally:
            receiver.close()


def test_by_default_the_sdk_defaults_stand() -> None:
    """No linger: the SDK's 0.2 s wait for a batch to fill and its socket timeout are left alone."""
    with ServiceBusClient.from_connection_string(CONNECTION) as client:
        receiver: Any = ServiceBusSource(client, "assignment-requests")._get_receiver()
        try:
            assert receiver._further_pull_receive_timeout == pytest.approx(0.2)
            assert receiver._config.socket_timeout == pytest.approx(0.2)
        finally:
            receiver.close()


def test_an_sdk_without_the_attribute_gets_a_warning_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    """An SDK upgrade that renames the internal: receiving goes on at 0.2 s, with one WARNING."""

    class Receiver:
        pass

    with caplog.at_level(logging.WARNING):
        assert set_linger(Receiver(), 0.05) is False  # type: ignore[arg-type]
    assert "Receive linger not set" in caplog.text


def test_the_linger_is_an_optional_setting() -> None:
    """AB_WORKER_RECEIVE_LINGER: unset by default, 0 to 1 s when set."""
    assert WorkerSettings().receive_linger is None
    assert WorkerSettings(receive_linger=0.05).receive_linger == 0.05
    with pytest.raises(ValueError, match="receive_linger"):
        WorkerSettings(receive_linger=2)
