"""The pure parts of an idempotent replay: what counts as a dropped connection, and duplicate detection on
the requests queue wherever the project ships one (issue 16 §4)."""

from __future__ import annotations

from pathlib import Path

import pytest
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthorizationError,
    ServiceBusCommunicationError,
    ServiceBusConnectionError,
    ServiceBusError,
    ServiceBusServerBusyError,
)

from adapters.local.broker import BrokerConfig
from adapters.local.broker.config import DEFAULT_QUEUE
from adapters.servicebus.dlq import Entity, Patience, is_dropped, replay_message
from tests.dead_letters import dead_letter

EMULATOR_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "servicebus-emulator" / "Config.json"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Failed to complete the message as the handler has already been shutdown."),
        ServiceBusConnectionError(message="Connection reset by peer"),
        ServiceBusCommunicationError(message="socket error"),
        OperationTimeoutError(message="timed out"),
        ServiceBusServerBusyError(message="busy"),
        ConnectionResetError(104, "Connection reset by peer"),
        AttributeError("'NoneType' object has no attribute 'create_receiver_link'"),
        ServiceBusError(
            message="Handler failed: 'NoneType' object has no attribute 'client_ready'.",
            error=AttributeError("'NoneType' object has no attribute 'client_ready'"),
        ),
    ],
)
def test_what_the_sdk_raises_when_a_connection_breaks_is_a_drop(error: BaseException) -> None:
    """Ridden out by reconnecting: the shut-down handler's ValueError among them (the issue's exit 2)."""
    assert is_dropped(error)


@pytest.mark.parametrize(
    "error",
    [
        MessageAlreadySettled(action="complete"),
        MessageSizeExceededError(message="too large"),
        MessageLockLostError(message="lock lost"),
        MessagingEntityNotFoundError(message="no such entity"),
        ServiceBusAuthorizationError(message="unauthorized"),
        ServiceBusError(message="amqp:not-allowed"),
        KeyError("a bug"),
    ],
)
def test_refusals_and_message_errors_are_not_drops(error: BaseException) -> None:
    """A refusal ends the command (one line, exit 5); a message's own error is that message's outcome."""
    assert not is_dropped(error)


def test_patience_counts_reconnects_without_progress_and_backs_off() -> None:
    """Six reconnects in a row without progress are tolerated; the seventh gives up."""
    patience = Patience(attempts=6, first=0.0)
    assert not patience.exhausted(6)
    assert patience.exhausted(7)


def test_the_same_dead_letter_gets_the_same_copy_id_in_every_run() -> None:
    """Whatever run sends it, a dead letter's copy has one id: a second copy is recognisable as such."""
    letter = dead_letter(
        sequence_number=4, delivery_count=3, reason="UnknownExperiment", message_id="m4", body=b'{"user_id": "U"}'
    )
    first = replay_message(letter, Entity.parse(DEFAULT_QUEUE))
    letter.delivery_count = 9  # a later run, after locks lapsed
    second = replay_message(letter, Entity.parse(DEFAULT_QUEUE))
    assert first.message_id == second.message_id


@pytest.mark.parametrize(
    ("config", "window"),
    [
        (BrokerConfig.load(EMULATOR_CONFIG), 300.0),  # the official emulator refuses more than 5 minutes
        (BrokerConfig.default(), 600.0),  # Service Bus's default, which the Bicep template deploys
    ],
    ids=["emulator", "embedded"],
)
def test_the_requests_queue_detects_duplicates_in_every_broker_the_project_ships(
    config: BrokerConfig, window: float
) -> None:
    """On, over the longest window each allows: a second copy of one dead letter is dropped."""
    (queue,) = [q for q in config.queues if q.name == DEFAULT_QUEUE]
    assert queue.properties.requires_duplicate_detection
    assert queue.properties.duplicate_detection_window == window
