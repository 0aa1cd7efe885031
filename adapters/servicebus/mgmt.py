"""Management operations by lock token on a receiver's connection, through the pinned SDK's internals.

Service Bus settles and renews a message of a non-session entity by its lock token over the
entity's management link (``com.microsoft:update-disposition``, ``com.microsoft:renew-lock``, each
taking an array of tokens), whatever receive link the message came on, while its lock holds. The
pinned SDK (azure-servicebus 7.15, pyAMQP) has no public API for either in bulk or across links, so
these small functions use its private helpers; each is the one place that touches them, behind a
guard that fails closed: an SDK that moved them raises :class:`SdkSurfaceMissing` (or returns
False), and the caller logs one WARNING and takes its safe fallback (renew one by one through the
public API; report a settlement lost, so the broker redelivers; rebuild the connection in time).

:func:`top_up_management_credit` works around an SDK bug: pyAMQP grants its management response
link 10,000 credits at attach and never grants more, so after 10,000 management operations on one
connection every later one (renewals, peeks, settlements) times out while the connection is
healthy. Found by reproducing issue 16 §2: one-by-one renewals of 4,000 locks on a 5 s lock spend
the credit in about three seconds.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from typing import Any

from adapters.servicebus.settle import stamp_link

log = logging.getLogger(__name__)

#: Lock tokens per management request (renewal or settlement): a few KB on the wire.
MAX_TOKENS_PER_REQUEST = 500

#: The SDK's settle operations we use, as their ``disposition-status`` on the management link.
DISPOSITIONS = {"complete": "completed", "abandon": "abandoned", "dead-letter": "suspended"}


class SdkSurfaceMissing(Exception):
    """The pinned SDK's private surface is not what this module expects (an SDK upgrade moved it)."""

    def __init__(self, what: str, exc: BaseException) -> None:
        super().__init__(
            f"{what} unavailable: the Service Bus SDK's internals are not as expected ({type(exc).__name__}: {exc})"
        )


def renew_locks(receiver: Any, messages: Sequence[Any], timeout: float | None) -> None:
    """Renew the locks of ``messages`` with one ``renew-lock`` request; updates each one's ``locked_until_utc``.

    Raises what the SDK raises (``MessageLockLostError`` when the broker refuses a token, a
    ``ServiceBusError`` when the connection fails), or :class:`SdkSurfaceMissing` (logged once).
    """
    try:
        renew = receiver._renew_locks
        tokens = [m.lock_token for m in messages]
    except AttributeError as exc:
        raise SdkSurfaceMissing("Bulk lock renewal", exc) from None
    response = renew(*tokens, timeout=timeout)
    try:
        expirations = response[b"expirations"]
        if len(expirations) != len(messages):
            raise ValueError(f"{len(expirations)} expirations for {len(messages)} tokens")
        for message, millis in zip(messages, expirations, strict=True):
            # What the public renew_message_lock does: the SDK's settle checks this expiry.
            message._expiry = datetime.datetime.fromtimestamp(millis / 1000.0, datetime.UTC)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SdkSurfaceMissing("Bulk lock renewal", exc) from None


def settle_by_lock_token(
    receiver: Any,
    action: str,
    messages: Sequence[Any],
    *,
    reason: str | None = None,
    description: str | None = None,
) -> None:
    """Settle ``messages`` (``complete``, ``abandon``, ``dead-letter``) by lock token on the management link.

    Works for messages received on any link of the entity, while their locks hold. Each attempt is
    bounded by the client's ``try_timeout`` and retried by its retry policy. Raises what the SDK
    raises (``MessageLockLostError`` when a lock is gone), or :class:`SdkSurfaceMissing`.
    """
    details = None
    if action == "dead-letter":
        details = {"deadletter-reason": reason or "", "deadletter-description": description or ""}
    try:
        settle = receiver._settle_message_via_mgmt_link
        tokens = [m.lock_token for m in messages]
        if any(token is None for token in tokens):
            raise ValueError("a message without a lock token")
    except (AttributeError, ValueError) as exc:
        raise SdkSurfaceMissing("Settlement by lock token", exc) from None
    try:
        retrying = receiver._do_retryable_operation
    except AttributeError as exc:
        raise SdkSurfaceMissing("Settlement by lock token", exc) from None
    # Through the SDK's retry loop, as its own settle methods go: it maps transport errors to
    # ServiceBusError subclasses and reopens a dropped connection before the next attempt.
    retrying(settle, settlement=DISPOSITIONS[action], lock_tokens=tokens, dead_letter_details=details)
    for message in messages:
        # As the SDK's own settle methods do: the message reads as settled (no lock, no token) from now on.
        message._settled = True


def top_up_management_credit(receiver: Any) -> None:
    """Grant the management response links of ``receiver``'s connection their credit again when half is spent.

    Raises :class:`SdkSurfaceMissing` when the SDK's internals are not as expected: the caller then
    counts its own management requests and rebuilds the connection before the credit runs out.
    """
    try:
        handler = receiver._handler
        if handler is None:
            return
        for operation in list(handler._mgmt_links.values()):
            link = operation._mgmt_link._response_link
            if link.current_link_credit < link.link_credit // 2:
                link.flow()
    except (AttributeError, TypeError) as exc:
        raise SdkSurfaceMissing("Management link credit top-up", exc) from None


def keep_unreturned_on_failure(receiver: Any, taking: Callable[[], bool], keep: Callable[[list[Any]], None]) -> None:
    """Take the messages the SDK buffered but never returned when it shuts a broken handler down.

    A receive that a connection reset interrupts has messages the broker already delivered (and
    locked) in the handler's buffer; the SDK's close would try to release them over the dead link,
    fail, and leave their locks to lapse (one delivery counted each). Instead, while ``taking()``
    (not during the caller's own close, whose release must stand), they are built as received
    messages, stamped with the dying link, and handed to ``keep``: the caller processes them and
    settles them by lock token. Wraps the receiver's ``_close_handler``; raises
    :class:`SdkSurfaceMissing` when the SDK's internals are not as expected.
    """
    try:
        close_handler = receiver._close_handler
        build = receiver._build_received_message
    except AttributeError as exc:
        raise SdkSurfaceMissing("Keeping the messages of a broken receive", exc) from None

    def close_and_keep() -> None:
        if taking():
            try:
                buffered = receiver._handler._received_messages
                taken = []
                while not buffered.empty():
                    taken.append(buffered.get_nowait())
                if taken:
                    messages = [build(item) for item in taken]
                    stamp_link(receiver, messages)
                    keep(messages)
            except Exception as exc:  # the SDK's own close must run whatever this meets
                log.warning("Could not keep the messages of a broken receive (%s: %s)", type(exc).__name__, exc)
        close_handler()

    receiver._close_handler = close_and_keep
