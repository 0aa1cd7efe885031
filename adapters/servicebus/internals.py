"""Every use of azure-servicebus's private surface (7.15, pyAMQP) is here, and only here.

The pinned SDK has no public API for several things the worker needs: waiting less than 0.2 s for
a batch to fill, reaching the socket under a call that hangs on a silent connection, telling which
AMQP link a message arrived on, settling a run of deliveries with one disposition, renewing and
settling locks in bulk by lock token over the management link, keeping the management link's
credit, and keeping what a broken receive had already taken delivery of. Each is one small function
here behind a :class:`~adapters.sdk_guards.Guard` (:data:`GUARDS` lists them). When an SDK release
moved what a guard reaches, the guard *trips*: one WARNING per process naming it and its fallback,
then the fallback, which is always correct: a function answers "cannot tell" (``None``, ``False``)
or raises :class:`~adapters.sdk_guards.SdkSurfaceMissing` for its caller's fallback. Never open:
what cannot be read is never taken for the expected answer (a link that cannot be told is not the
current link, so nothing is settled by a delivery id that may mean another message).

``make lint`` keeps every other module of the product off this SDK's private surface (the
``sdk_internals`` import-linter contract); ``tests/integration/test_sdk_contract.py`` pins each guard
to the real SDK, and ``make sdk-drill`` runs those tests against the newest release.

:func:`top_up_management_credit` works around an SDK bug: pyAMQP grants its management response
link 10,000 credits at attach and never grants more, so after 10,000 management operations on one
connection every later one (renewals, peeks, settlements) times out while the connection is
healthy. Found by reproducing issue 16 §2: one-by-one renewals of 4,000 locks on a 5 s lock spend
the credit in about three seconds.
"""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from adapters.sdk_guards import GuardSet

if TYPE_CHECKING:
    from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver, ServiceBusSender

log = logging.getLogger(__name__)

#: The SDK release these guards were verified against (``make sdk-drill`` tries newer ones).
VERIFIED_VERSION = "7.15.0"

GUARDS = GuardSet(("azure-servicebus",), log)

RECEIVE_LINGER = GUARDS.add(
    "receive linger",
    reaches="receiver._further_pull_receive_timeout",
    fallback="receives wait the SDK's 0.2 s for more messages after the first",
)
CONNECTION_SOCKET = GUARDS.add(
    "connection socket",
    reaches="receiver._handler._connection._transport.sock",
    fallback=(
        "the watchdog cannot abort a call blocked on a silent connection (try_timeout and the liveness "
        "probe still bound it), and a closing receiver's socket reads stay linger-short"
    ),
)
LINK_IDENTITY = GUARDS.add(
    "link identity",
    reaches="receiver._handler, receiver._handler._link",
    fallback=(
        "no message counts as received on the current link: range settlement is off and each message is "
        "settled through the SDK's own API"
    ),
)
RANGE_SETTLEMENT = GUARDS.add(
    "range settlement",
    reaches=(
        "receiver._handler.settle_messages, message._delivery_id, message._delivery_tag, message._settled, "
        "azure.servicebus._pyamqp.error.AMQPException"
    ),
    fallback="completing one message per round trip",
)
BULK_RENEWAL = GUARDS.add(
    "bulk lock renewal",
    reaches="receiver._renew_locks, message._expiry",
    fallback="renewing one lock per request through the public renew_message_lock",
)
SETTLEMENT_BY_TOKEN = GUARDS.add(
    "settlement by lock token",
    reaches="receiver._settle_message_via_mgmt_link, receiver._do_retryable_operation, message._settled",
    fallback="a message from a replaced link waits out its lock and is redelivered (one delivery counted)",
)
MANAGEMENT_CREDIT = GUARDS.add(
    "management link credit",
    reaches="receiver._handler._mgmt_links[...]._mgmt_link._response_link",
    fallback="the receiver is rebuilt every 9,000 management requests, before the SDK's 10,000 credits run out",
)
KEEP_UNRETURNED = GUARDS.add(
    "keeping a broken receive's messages",
    reaches="receiver._close_handler, receiver._build_received_message, receiver._handler._received_messages",
    fallback="what a receive cut by a connection reset had taken delivery of stays locked until its lock expires",
)
NO_KEEP_ALIVE = GUARDS.add(
    "no receiver keep-alive thread",
    reaches="receiver._create_handler, receiver._handler._keep_alive_interval",
    fallback=(
        "the SDK's keep-alive thread reads the receiver's connection every 5 s outside the source's lock; "
        "racing a receive or a renewal, it can hand a message another's delivery tag and drop it"
    ),
)


def _private(sdk_object: object) -> Any:
    """``sdk_object`` seen through its private surface, which the SDK does not type or promise: ``Any`` on purpose.

    Every read through it is guarded (an ``AttributeError`` trips its guard), so the public types of
    the parameters above stay exact while what they reach into is checked at run time, not by mypy.
    """
    return sdk_object


#: The SDK's settle operations we use, as their ``disposition-status`` on the management link.
DISPOSITIONS = {"complete": "completed", "abandon": "abandoned", "dead-letter": "suspended"}


# -- receiving ------------------------------------------------------------------------------------


def set_receive_linger(receiver: ServiceBusReceiver, seconds: float) -> bool:
    """Make a receive wait ``seconds`` (not the SDK's 0.2 s) for each further message; False if it cannot."""
    if not isinstance(receive_linger(receiver), int | float):
        GUARDS.trip(RECEIVE_LINGER, "no numeric _further_pull_receive_timeout on the receiver")
        return False
    _private(receiver)._further_pull_receive_timeout = seconds
    return True


def receive_linger(receiver: ServiceBusReceiver) -> float | None:
    """How long a receive waits for each further message (None: the SDK keeps it elsewhere)."""
    value = getattr(receiver, "_further_pull_receive_timeout", None)
    return value if isinstance(value, int | float) else None


def connection_socket(handler_owner: ServiceBusReceiver | ServiceBusSender) -> socket.socket | None:
    """The socket under an SDK sender or receiver; None when it is not connected (or the guard tripped)."""
    try:
        handler = _private(handler_owner)._handler
        connection = None if handler is None else handler._connection
        sock = None if connection is None else connection._transport.sock
    except AttributeError as exc:
        GUARDS.trip(CONNECTION_SOCKET, exc)
        return None
    if sock is not None and not isinstance(sock, socket.socket):
        GUARDS.trip(CONNECTION_SOCKET, f"the transport's sock is a {type(sock).__name__}")
        return None
    return sock


def keep_unreturned_on_failure(
    receiver: ServiceBusReceiver,
    taking: Callable[[], bool],
    keep: Callable[[list[ServiceBusReceivedMessage]], None],
) -> None:
    """Hand ``keep`` the messages the SDK buffered but never returned when it shuts a broken handler down.

    A receive that a connection reset interrupts has messages the broker already delivered (and
    locked) in the handler's buffer; the SDK's close would try to release them over the dead link,
    fail, and leave their locks to lapse (one delivery counted each). Instead, while ``taking()``
    (not during the caller's own close, whose release must stand), they are built as received
    messages and handed to ``keep`` before the SDK's close runs (the handler is still the dying
    one). Wraps the receiver's ``_close_handler``; raises
    :class:`~adapters.sdk_guards.SdkSurfaceMissing` when the guard trips.
    """
    try:
        close_handler = _private(receiver)._close_handler
        build = _private(receiver)._build_received_message
    except AttributeError as exc:
        raise GUARDS.trip(KEEP_UNRETURNED, exc) from None

    def close_and_keep() -> None:
        try:
            taken = _take_buffered(receiver, build) if taking() else []
            if taken:
                keep(taken)
        except Exception as exc:  # the caller's keep: the SDK's own close must run whatever it meets
            log.warning("Could not keep the messages of a broken receive (%s: %s)", type(exc).__name__, exc)
        finally:
            close_handler()

    _private(receiver)._close_handler = close_and_keep


def _take_buffered(
    receiver: ServiceBusReceiver, build: Callable[[object], ServiceBusReceivedMessage]
) -> list[ServiceBusReceivedMessage]:
    """Empty the handler's buffer of delivered messages into received messages ([] when the guard trips)."""
    try:
        handler = _private(receiver)._handler
        buffered = None if handler is None else handler._received_messages  # None: already shut down
        taken = []
        while buffered is not None and not buffered.empty():
            taken.append(buffered.get_nowait())
        return [build(item) for item in taken]
    except Exception as exc:
        GUARDS.trip(KEEP_UNRETURNED, exc)
        return []


def stop_keep_alive(receiver: ServiceBusReceiver) -> None:
    """Keep every handler ``receiver`` opens from starting the SDK's keep-alive thread.

    With prefetch 0 pyAMQP starts a thread per handler that calls ``connection.listen`` every 5 s
    from outside any lock of ours, so it processes incoming transfers at the same time as a receive,
    a renewal or a liveness peek on another thread. The receive link's transfer state (the frame
    that began a delivery, its partial payload, the set of delivery tags) is shared unguarded: one
    message can be handed on with another's delivery tag, its own never settled, its lock left to
    lapse (a delivery counted); the SDK logs ``Transfer callback function failed with error:
    KeyError(<tag>)`` and drops it. Every read of the connection is then the source's own, one at a
    time under its lock; its receives and renewals read often enough to answer heartbeats and to
    release what arrives between receives. Raises :class:`~adapters.sdk_guards.SdkSurfaceMissing`
    when the guard trips (the caller then lives with the SDK's thread).
    """
    try:
        create_handler = _private(receiver)._create_handler
    except AttributeError as exc:
        raise GUARDS.trip(NO_KEEP_ALIVE, exc) from None

    def create_without_keep_alive(*args: Any, **kwargs: Any) -> None:
        create_handler(*args, **kwargs)
        handler = _private(receiver)._handler
        if not isinstance(getattr(handler, "_keep_alive_interval", None), int):
            GUARDS.trip(NO_KEEP_ALIVE, "no integer _keep_alive_interval on the handler")
            return
        handler._keep_alive_interval = 0  # read by the handler's open(): 0 starts no thread

    _private(receiver)._create_handler = create_without_keep_alive


# -- telling links apart --------------------------------------------------------------------------


def link_identity(receiver: ServiceBusReceiver) -> tuple[object, object] | None:
    """The objects that change when the SDK opens a new receive link: its handler and the handler's link.

    None when they cannot be read (the guard tripped): the link cannot be told, and nothing may be
    settled by delivery id. A receiver whose handler was shut down (``_handler`` is None) has no
    link: ``(None, None)``.
    """
    try:
        handler = _private(receiver)._handler
        link = None if handler is None else handler._link
    except AttributeError as exc:
        GUARDS.trip(LINK_IDENTITY, exc)
        return None
    return handler, link


# -- settling a run of deliveries with one disposition --------------------------------------------


def delivery_id(message: ServiceBusReceivedMessage) -> int:
    """The message's AMQP delivery id on the link it arrived on; raises ``SdkSurfaceMissing`` when unreadable."""
    value = getattr(message, "_delivery_id", None)
    if not isinstance(value, int):
        raise GUARDS.trip(RANGE_SETTLEMENT, f"delivery id {value!r}")
    return value


def range_errors() -> tuple[type[BaseException], ...]:
    """What a range disposition raises when the link broke or its outcome did not come in time."""
    try:
        from azure.servicebus._pyamqp.error import AMQPException
    except ImportError as exc:
        raise GUARDS.trip(RANGE_SETTLEMENT, exc) from None
    return AMQPException, TimeoutError, ValueError, OSError


def settle_range(
    receiver: ServiceBusReceiver, messages: Sequence[ServiceBusReceivedMessage], outcome_timeout: float
) -> None:
    """Complete ``messages`` (consecutive delivery ids, ascending, all from the current link) with one disposition.

    Waits up to ``outcome_timeout`` for the broker's outcome; the messages then read as settled to
    the SDK (no lock token). Raises one of :func:`range_errors` when the link broke or the outcome
    did not come in time, :class:`~adapters.sdk_guards.SdkSurfaceMissing` when the guard trips.
    """
    first, last = delivery_id(messages[0]), delivery_id(messages[-1])
    try:
        handler = _private(receiver)._handler
        tag = _private(messages[0])._delivery_tag
        _check_settled_flag(messages)
    except AttributeError as exc:
        raise GUARDS.trip(RANGE_SETTLEMENT, exc) from None
    if handler is None:
        raise ValueError("the receiver's handler was shut down")
    try:
        settle = handler.settle_messages
        settle((first, last), tag, "accepted", await_outcome=True, outcome_timeout=outcome_timeout)
    except (AttributeError, TypeError) as exc:  # moved, or a changed signature
        raise GUARDS.trip(RANGE_SETTLEMENT, exc) from None
    _mark_settled(messages)


def _check_settled_flag(messages: Sequence[ServiceBusReceivedMessage]) -> None:
    """AttributeError unless each message has the flag the SDK's own settle methods set (checked before settling)."""
    for message in messages:
        settled = _private(message)._settled
        if not isinstance(settled, bool):
            raise AttributeError(f"_settled is a {type(settled).__name__}")


def _mark_settled(messages: Sequence[ServiceBusReceivedMessage]) -> None:
    # As the SDK's own settle methods do: the message reads as settled (no lock, no token) from now on.
    for message in messages:
        _private(message)._settled = True


# -- the management link: renewal and settlement by lock token ------------------------------------


def renew_locks(
    receiver: ServiceBusReceiver, messages: Sequence[ServiceBusReceivedMessage], timeout: float | None
) -> None:
    """Renew the locks of ``messages`` with one ``renew-lock`` request; updates each one's ``locked_until_utc``.

    Raises what the SDK raises (``MessageLockLostError`` when the broker refuses a token, a
    ``ServiceBusError`` when the connection fails), or :class:`~adapters.sdk_guards.SdkSurfaceMissing`.
    """
    try:
        renew = _private(receiver)._renew_locks
        tokens = [m.lock_token for m in messages]
        if not all(hasattr(m, "_expiry") for m in messages):  # where the SDK keeps a renewed expiry
            raise AttributeError("no _expiry on the message")
    except AttributeError as exc:
        raise GUARDS.trip(BULK_RENEWAL, exc) from None
    response = renew(*tokens, timeout=timeout)
    try:
        expirations = response[b"expirations"]
        if len(expirations) != len(messages):
            raise ValueError(f"{len(expirations)} expirations for {len(messages)} tokens")
        for message, millis in zip(messages, expirations, strict=True):
            # What the public renew_message_lock does: the SDK's settle checks this expiry.
            _private(message)._expiry = datetime.datetime.fromtimestamp(millis / 1000.0, datetime.UTC)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GUARDS.trip(BULK_RENEWAL, exc) from None


def settle_by_lock_token(
    receiver: ServiceBusReceiver,
    action: str,
    messages: Sequence[ServiceBusReceivedMessage],
    *,
    reason: str | None = None,
    description: str | None = None,
) -> None:
    """Settle ``messages`` (``complete``, ``abandon``, ``dead-letter``) by lock token on the management link.

    Works for messages received on any link of the entity, while their locks hold. Each attempt is
    bounded by the client's ``try_timeout`` and retried by its retry policy. Raises what the SDK
    raises (``MessageLockLostError`` when a lock is gone), or :class:`~adapters.sdk_guards.SdkSurfaceMissing`.
    """
    details = None
    if action == "dead-letter":
        details = {"deadletter-reason": reason or "", "deadletter-description": description or ""}
    try:
        settle = _private(receiver)._settle_message_via_mgmt_link
        retrying = _private(receiver)._do_retryable_operation
        _check_settled_flag(messages)
    except AttributeError as exc:
        raise GUARDS.trip(SETTLEMENT_BY_TOKEN, exc) from None
    tokens = [m.lock_token for m in messages]
    if any(token is None for token in tokens):
        raise ValueError("a message without a lock token (already settled)")
    # Through the SDK's retry loop, as its own settle methods go: it maps transport errors to
    # ServiceBusError subclasses and reopens a dropped connection before the next attempt.
    try:
        retrying(settle, settlement=DISPOSITIONS[action], lock_tokens=tokens, dead_letter_details=details)
    except TypeError as exc:  # a changed signature
        raise GUARDS.trip(SETTLEMENT_BY_TOKEN, exc) from None
    _mark_settled(messages)


def management_response_links(receiver: ServiceBusReceiver) -> list[Any]:  # pyAMQP's, private: Any
    """The response links of the management operations open on ``receiver``'s connection (pyAMQP ``ReceiverLink``)."""
    try:
        handler = _private(receiver)._handler
        if handler is None:
            return []
        return [operation._mgmt_link._response_link for operation in list(handler._mgmt_links.values())]
    except (AttributeError, TypeError) as exc:
        raise GUARDS.trip(MANAGEMENT_CREDIT, exc) from None


def top_up_management_credit(receiver: ServiceBusReceiver) -> None:
    """Grant the management response links of ``receiver``'s connection their credit again when half is spent.

    Raises :class:`~adapters.sdk_guards.SdkSurfaceMissing` when the guard trips: the caller then counts its own
    management requests and rebuilds the connection before the credit runs out.
    """
    for link in management_response_links(receiver):
        try:
            if link.current_link_credit < link.link_credit // 2:
                link.flow()
        except (AttributeError, TypeError) as exc:
            raise GUARDS.trip(MANAGEMENT_CREDIT, exc) from None
