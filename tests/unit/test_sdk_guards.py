"""Every guard around an SDK's private surface fails closed, with one WARNING per process (issue 16 §6, 17 §3).

The SDKs here are the real ones, with their private surface taken away: a real receiver behind
:class:`PublicOnly` (what an SDK that renamed its internals looks like from outside), or a real
object with one attribute deleted. Closed means the fallback, never a guess: "cannot tell" is not
"the current link", a renewal that cannot be made in bulk is made one by one. The guards' hold on
the real SDK is pinned by tests/integration/test_sdk_contract.py and test_kusto_sdk_contract.py.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiver
from pydantic import ValidationError

from adapters.kusto import internals as kusto_internals
from adapters.sdk_guards import GuardSet, SdkSurfaceMissing
from adapters.servicebus import internals
from adapters.servicebus.settle import RangeSettlement, on_current_link, stamp_link
from adapters.servicebus.source import widen_read_slice
from tests.renamed_sdk import PublicOnly as _PublicOnly
from tests.sdk_drill import CONTRACT_TESTS
from worker.service.ports import Delivery
from worker.service.settings import WorkerSettings

CONNECTION = "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"


class _Obj:
    """An SDK-shaped object that, like the SDK's own, takes weak references."""

    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


#: The stand-ins go where the SDK's own types are expected, as the guards see SDK objects: by what they
#: have, not by their type. Any, so a test may hand one over (and set the private attributes it reads).
Obj: Any = _Obj
PublicOnly: Any = _PublicOnly
Namespace: Any = SimpleNamespace


@pytest.fixture(autouse=True)
def fresh_guards() -> Iterator[None]:
    """Each test sees its own WARNINGs (a guard warns once per process)."""
    internals.GUARDS.reset()
    kusto_internals.GUARDS.reset()
    yield
    internals.GUARDS.reset()
    kusto_internals.GUARDS.reset()


@pytest.fixture
def receiver() -> Iterator[ServiceBusReceiver]:
    """A real SDK receiver, built lazily: nothing connects."""
    with ServiceBusClient.from_connection_string(CONNECTION) as client:
        sdk_receiver = client.get_queue_receiver("assignment-requests")
        try:
            yield sdk_receiver
        finally:
            sdk_receiver.close()


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def message(**attributes: object) -> Any:
    """A received message as the guards see it, locked and unsettled unless told otherwise."""
    return Obj(**{"lock_token": "t", "locked_until_utc": None, "message_id": "m", **attributes})


def moved_receive_linger(receiver: ServiceBusReceiver) -> object:
    if hasattr(receiver, "_further_pull_receive_timeout"):  # called twice: deleted the first time
        del receiver._further_pull_receive_timeout
    return internals.set_receive_linger(receiver, 0.01)


def moved_connection_socket(receiver: ServiceBusReceiver) -> object:
    return internals.connection_socket(PublicOnly(receiver))


def moved_link_identity(receiver: ServiceBusReceiver) -> object:
    return internals.link_identity(PublicOnly(receiver))


def moved_range_settlement(receiver: ServiceBusReceiver) -> object:
    internals.settle_range(receiver, [message(), message()], outcome_timeout=1)
    return None  # not reached: the guard raises SdkSurfaceMissing


def moved_bulk_renewal(receiver: ServiceBusReceiver) -> object:
    internals.renew_locks(PublicOnly(receiver), [message(_expiry=None)], timeout=1)
    return None  # not reached: the guard raises SdkSurfaceMissing


def moved_settlement_by_token(receiver: ServiceBusReceiver) -> object:
    internals.settle_by_lock_token(PublicOnly(receiver), "complete", [message(_settled=False)])
    return None  # not reached: the guard raises SdkSurfaceMissing


def moved_management_credit(receiver: ServiceBusReceiver) -> object:
    internals.top_up_management_credit(PublicOnly(receiver))
    return None  # not reached: the guard raises SdkSurfaceMissing


def moved_keep_unreturned(receiver: ServiceBusReceiver) -> object:
    internals.keep_unreturned_on_failure(PublicOnly(receiver), lambda: True, lambda kept: None)
    return None  # not reached: the guard raises SdkSurfaceMissing


def moved_keep_alive(receiver: ServiceBusReceiver) -> object:
    internals.stop_keep_alive(PublicOnly(receiver))
    return None  # not reached: the guard raises SdkSurfaceMissing


def moved_transport_timeouts(receiver: ServiceBusReceiver) -> object:
    return kusto_internals.http_sessions(Obj(_kusto_client=Obj(_http=object())))


#: Each guard with the SDK's private surface taken away, and the fallback it must answer (or raise).
MOVED: dict[str, tuple[Callable[[ServiceBusReceiver], object], object]] = {
    "receive linger": (moved_receive_linger, False),
    "connection socket": (moved_connection_socket, None),
    "link identity": (moved_link_identity, None),
    "range settlement": (moved_range_settlement, SdkSurfaceMissing),
    "bulk lock renewal": (moved_bulk_renewal, SdkSurfaceMissing),
    "settlement by lock token": (moved_settlement_by_token, SdkSurfaceMissing),
    "management link credit": (moved_management_credit, SdkSurfaceMissing),
    "keeping a broken receive's messages": (moved_keep_unreturned, SdkSurfaceMissing),
    "no receiver keep-alive thread": (moved_keep_alive, SdkSurfaceMissing),
    "transport timeouts": (moved_transport_timeouts, []),
}


def guard_sets() -> list[GuardSet]:
    return [internals.GUARDS, kusto_internals.GUARDS]


@pytest.mark.parametrize("name", sorted(MOVED))
def test_each_guard_fails_closed_with_one_warning(
    name: str, receiver: ServiceBusReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Twice against an SDK that moved what the guard reaches: the fallback both times, one WARNING naming it."""
    moved, fallback = MOVED[name]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            if fallback is SdkSurfaceMissing:
                with pytest.raises(SdkSurfaceMissing) as raised:
                    moved(receiver)
                assert raised.value.guard.name == name
            else:
                assert moved(receiver) == fallback
    (warning,) = warnings_in(caplog)
    assert f"{name} is off" in warning
    tripped = {guard_set: guard_set.tripped for guard_set in guard_sets()}
    assert set().union(*tripped.values()) == {name}
    owner = next(guard_set for guard_set, names in tripped.items() if names)
    assert owner.guards[name].fallback in warning
    assert all(version in warning for version in owner.versions().values())


def test_every_guard_has_a_fail_closed_case_and_a_contract_test_on_the_real_sdk() -> None:
    """A new guard needs both: its fallback here, its hold on the real SDK in a contract test (make sdk-drill)."""
    declared = {name for guard_set in guard_sets() for name in guard_set.guards}
    assert set(MOVED) == declared
    pinned: set[str] = set()
    for path in CONTRACT_TESTS:
        for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.mark.sdk_guard":
                pinned.update(str(arg.value) for arg in node.args if isinstance(arg, ast.Constant))
    assert pinned == declared


def test_an_unconnected_receiver_has_no_socket_and_trips_nothing(receiver: ServiceBusReceiver) -> None:
    """No handler yet (or shut down) is not a moved surface: no socket, no WARNING."""
    assert internals.connection_socket(receiver) is None
    assert widen_read_slice(receiver, 0.2) is False
    assert internals.link_identity(receiver) == (None, None)
    assert internals.GUARDS.tripped == frozenset()


def test_an_sdk_without_handler_internals_is_never_on_the_current_link() -> None:
    """Without ``_handler`` both stamps would be None and ``None is None`` held: now unknown (never True)."""
    receiver = Namespace()  # an SDK that renamed _handler
    msg = Namespace()
    stamp_link(receiver, [msg])
    assert on_current_link(receiver, msg) is None
    assert on_current_link(receiver, msg) is None
    assert internals.GUARDS.tripped == {"link identity"}


def test_a_handler_without_its_link_is_never_on_the_current_link() -> None:
    """The link object inside the handler is part of the identity: without it, unknown (never True)."""
    receiver = Namespace(_handler=Namespace())  # a handler without _link
    msg = Namespace()
    stamp_link(receiver, [msg])
    assert on_current_link(receiver, msg) is None


def test_a_link_kept_where_the_guard_does_not_look_is_never_the_current_one() -> None:
    """An SDK that keeps its link elsewhere and leaves ``_link = None``: None is None must not make it current.

    Messages received through such a handler trip the guard (a receive that returned messages had a
    link); a handler that simply has no link yet makes nothing current either.
    """
    receiver = Obj(_handler=Obj(_link=None, _receive_link=Obj()))
    msg = Obj()
    stamp_link(receiver, [msg])
    assert on_current_link(receiver, msg) is None
    assert internals.GUARDS.tripped == {"link identity"}
    internals.GUARDS.reset()
    stamp_link(receiver, [])  # no messages: nothing to tell, nothing tripped
    handler = Obj(_link=Obj())
    linked = Obj(_handler=handler)
    stamp_link(linked, [msg])
    handler._link = None  # the link detached, the handler not yet replaced
    assert on_current_link(linked, msg) is False
    assert internals.GUARDS.tripped == frozenset()


def test_a_message_that_takes_no_stamp_is_never_on_the_current_link() -> None:
    """A message class with ``__slots__`` (no room for the stamp): unknown, not an error in the receive."""

    class Slotted:
        __slots__ = ("lock_token",)

    receiver = Obj(_handler=Obj(_link=Obj()))
    msg = Slotted()
    stamp_link(receiver, [msg])
    assert on_current_link(receiver, msg) is None
    assert internals.GUARDS.tripped == {"link identity"}


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
    msg = Obj()
    stamp_link(receiver, [msg])
    receiver._handler = Obj(_link=Obj())  # the old handler is collected now
    assert on_current_link(receiver, msg) is False


def test_range_settlement_never_covers_a_message_from_an_unknown_link() -> None:
    """Even if a caller hands it such messages, no disposition is sent for them by delivery id."""
    sent: list[object] = []
    receiver = Namespace(_handler_moved=Namespace(settle_messages=lambda *a, **k: sent.append(a)))
    messages = [message(_delivery_id=i, _delivery_tag=b"t", _settled=False) for i in (1, 2)]
    stamp_link(receiver, messages)
    deliveries = [Delivery(body=b"", message_id=f"m{i}", handle=m) for i, m in enumerate(messages)]
    assert RangeSettlement().settle(receiver, deliveries) == deliveries
    assert sent == []


def test_range_settlement_turns_itself_off_when_its_guard_trips(caplog: pytest.LogCaptureFixture) -> None:
    """Messages without delivery ids: every one returned for one-by-one completion, and it stays off."""
    ranges = RangeSettlement()
    deliveries = [Delivery(body=b"", message_id=f"m{i}", handle=message()) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        assert ranges.settle(Obj(), deliveries) == deliveries
    assert not ranges.enabled
    assert ranges.settle(Obj(), deliveries) == deliveries  # off: not even tried
    assert len(warnings_in(caplog)) == 1
    assert "range settlement is off" in warnings_in(caplog)[0]


def test_a_settle_messages_whose_signature_changed_trips_the_guard_instead_of_failing_the_batch() -> None:
    """A TypeError from the SDK's call is a moved surface (off, one by one), not a broken link to retry."""

    def settle_messages(delivery_id: object, delivery_tag: object) -> None:  # an older/newer signature
        raise AssertionError("not reached")

    receiver = Obj(_handler=Obj(_link=Obj(), settle_messages=settle_messages))
    messages = [message(_delivery_id=i, _delivery_tag=b"t", _settled=False) for i in (7, 8)]
    stamp_link(receiver, messages)
    deliveries = [Delivery(body=b"", message_id=f"m{i}", handle=m) for i, m in enumerate(messages)]
    ranges = RangeSettlement()
    assert ranges.settle(receiver, deliveries) == deliveries
    assert not ranges.enabled
    assert internals.GUARDS.tripped == {"range settlement"}
    assert all(m._settled is False for m in messages)  # never marked settled


def test_widen_read_slice_is_false_when_the_socket_path_moved() -> None:
    """A connected receiver whose socket cannot be reached: not widened, and the guard says so once."""
    moved = Namespace(_handler=Namespace(_conn=object()))
    assert widen_read_slice(moved, 0.2) is False
    assert widen_read_slice(moved, 0.2) is False
    assert internals.GUARDS.tripped == {"connection socket"}


def test_cap_transport_timeouts_caps_nothing_on_an_unknown_client() -> None:
    """The sink's cap answers 0 sessions for a client it does not recognise, through the guard."""
    from adapters.kusto.sink import cap_transport_timeouts

    unknown: Any = object()  # not an ingest client at all
    assert cap_transport_timeouts(unknown, 1.0) == 0
    assert kusto_internals.GUARDS.tripped == {"transport timeouts"}


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
