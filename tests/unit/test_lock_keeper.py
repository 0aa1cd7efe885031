"""The lock keeper outlives whatever a renewal raises (issue 12's fault runs found one that killed it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.servicebus.lock import LockKeeper
from tests.waiting import wait_for


@dataclass
class Message:
    message_id: str
    locked_until_utc: datetime = field(default_factory=lambda: datetime.now(UTC) + timedelta(seconds=1))


class TearingReceiver:
    """Renews like the SDK, except that the first renewal of ``torn`` fails as a concurrent close made it."""

    def __init__(self, torn: str, surprise: type[Exception]) -> None:
        self.torn, self.surprise = torn, surprise
        self.renewed: list[str] = []

    def renew_message_lock(self, message: Message) -> None:
        if message.message_id == self.torn:
            self.torn = ""
            raise self.surprise("'NoneType' object has no attribute 'close'")
        self.renewed.append(message.message_id)
        message.locked_until_utc = datetime.now(UTC) + timedelta(seconds=1)


def test_an_sdk_surprise_during_a_renewal_fails_that_message_alone_and_the_keeper_goes_on() -> None:
    """An AttributeError from the SDK's handler teardown: that lock is given up, the others still renewed."""
    receiver = TearingReceiver("a", AttributeError)
    keeper = LockKeeper(margin=10.0, interval=0.02)
    held: list[Any] = [Message("a"), Message("b")]
    try:
        keeper.hold(receiver, held)  # type: ignore[arg-type]
        wait_for(lambda: receiver.renewed.count("b") >= 3, 10, "b renewed after a's failure")
        later: list[Any] = [Message("c")]
        keeper.hold(receiver, later)  # type: ignore[arg-type]
        wait_for(lambda: "c" in receiver.renewed, 10, "a message held later renewed too")
    finally:
        keeper.close()
    assert keeper.failures == 1
    assert "a" not in receiver.renewed


def test_an_unexpected_error_does_not_end_the_keeper_thread() -> None:
    """Anything else a round raises is logged; the next round still runs."""
    receiver = TearingReceiver("a", RuntimeError)
    keeper = LockKeeper(margin=10.0, interval=0.02)
    held: list[Any] = [Message("a"), Message("b")]
    try:
        keeper.hold(receiver, held)  # type: ignore[arg-type]
        wait_for(lambda: receiver.renewed.count("b") >= 3, 10, "renewals after a failed round")
    finally:
        keeper.close()
