"""Guards around the Service Bus SDK's internals fail closed and say so (issue 16 §6, issue 17 §3).

Objects shaped like an SDK that moved its private attributes stand in for the SDK here; the real
SDK's shapes are pinned by tests/integration/test_sdk_contract.py.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

import adapters.servicebus.settle as settle_module
import adapters.servicebus.source as source_module
from adapters.servicebus.settle import RangeSettlement, on_current_link, stamp_link
from adapters.servicebus.source import widen_read_slice
from worker.service.ports import Delivery
from worker.service.settings import WorkerSettings


class Obj:
    """An SDK-shaped object that, like the SDK's own, takes weak references."""

    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_sdk_without_handler_internals_is_never_on_the_current_link(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``_handler`` both stamps would be None and ``None is None`` held: now unknown, with one WARNING."""
    monkeypatch.setattr(settle_module, "_warned", set())
    receiver = SimpleNamespace()  # an SDK that renamed _handler
    message = SimpleNamespace()
    stamp_link(receiver, [message])
    with caplog.at_level(logging.WARNING):
        assert on_current_link(receiver, message) is None
        assert on_current_link(receiver, message) is None
    assert len(warnings_in(caplog)) == 1
    assert "range settlement is off" in warnings_in(caplog)[0]


def test_a_handler_without_its_link_is_never_on_the_current_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """The link object inside the handler is part of the identity: without it, unknown (never True)."""
    monkeypatch.setattr(settle_module, "_warned", set())
    receiver = SimpleNamespace(_handler=SimpleNamespace())  # a handler without _link
    message = SimpleNamespace()
    stamp_link(receiver, [message])
    assert on_current_link(receiver, message) is None


def test_a_link_reattached_in_place_is_a_different_link() -> None:
    """Same receiver and handler, a new link object: the old message is not on the current link."""
    handler = Obj(_link=Obj())
    receiver = Obj(_handler=handler)
    old, new = Obj(), Obj()
    stamp_link(receiver, [old])
    handler._link = Obj()
    stamp_link(receiver, [new])
    assert (on_current_link(receiver, old), on_current_link(receiver, new)) == (False, True)
    handler_gone = Obj(_handler=None)
    assert on_current_link(handler_gone, new) is False


def test_a_stamp_does_not_keep_the_link_alive() -> None:
    """A message holds its link weakly (a dead connection must not outlive it); a collected link is not current."""
    receiver = Obj(_handler=Obj(_link=Obj()))
    message = Obj()
    stamp_link(receiver, [message])
    receiver._handler = Obj(_link=Obj())  # the old handler is collected now
    assert on_current_link(receiver, message) is False


def test_range_settlement_never_covers_a_message_from_an_unknown_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even if a caller hands it such messages, no disposition is sent for them by delivery id."""
    monkeypatch.setattr(settle_module, "_warned", set())
    sent: list[object] = []
    receiver = SimpleNamespace(_handler_moved=SimpleNamespace(settle_messages=lambda *a, **k: sent.append(a)))
    messages = [
        SimpleNamespace(_delivery_id=i, _delivery_tag=b"t", _settled=False, locked_until_utc=None) for i in (1, 2)
    ]
    stamp_link(receiver, messages)
    deliveries = [Delivery(body=b"", message_id=f"m{i}", handle=m) for i, m in enumerate(messages)]
    assert RangeSettlement().settle(receiver, deliveries) == deliveries
    assert sent == []


def test_widen_read_slice_warns_once_when_the_socket_path_moved(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connected receiver whose socket cannot be reached: one WARNING; a receiver without a handler: none."""
    monkeypatch.setattr(source_module, "_warned", set())
    with caplog.at_level(logging.WARNING):
        assert widen_read_slice(SimpleNamespace(_handler=None), 0.2) is False
        assert warnings_in(caplog) == []
        moved = SimpleNamespace(_handler=SimpleNamespace(_conn=object()))
        assert widen_read_slice(moved, 0.2) is False
        assert widen_read_slice(moved, 0.2) is False
    assert len(warnings_in(caplog)) == 1
    assert "read slice not widened" in warnings_in(caplog)[0]


def test_a_liveness_timeout_below_its_floor_is_refused_naming_the_floor() -> None:
    """max_wait + a link open (try_timeout) + one dependency call (attempts x timeout): 1 + 10 + 3 x 5 = 26 s."""
    with pytest.raises(ValidationError) as raised:
        WorkerSettings(liveness_timeout=20)
    (error,) = raised.value.errors()
    assert error["loc"] == ("liveness_timeout",)
    assert "below its floor of 26 s" in error["msg"]
    assert WorkerSettings(liveness_timeout=26).liveness_floor == 26.0
    # The floor follows the settings it is made of.
    WorkerSettings(
        liveness_timeout=8, max_wait=1, servicebus_try_timeout=2, kusto_flush_attempts=1, kusto_attempt_timeout=5
    )
