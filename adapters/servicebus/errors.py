"""Classifying Service Bus SDK errors, once, into ours: transient (hold and retry) or refused for good.

The manual has this as a table (``docs/operations.md``, "Which failures are transient"). In short:
the service being busy, slow, unreachable, full or an entity disabled for now is
:class:`~worker.domain.errors.TransientError`; an entity that does not exist or may not be sent to
is refused for good — for a reply entity that condemns the one request that named it, for anything
else it is reported as
:class:`~worker.domain.errors.DependencyRefused`. A message too large for the entity is decided per
message by the publisher.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from azure.core.exceptions import AzureError
from azure.servicebus.exceptions import MessagingEntityNotFoundError, ServiceBusAuthorizationError, ServiceBusError

from worker.domain.errors import DependencyRefused, TransientError
from worker.service.redaction import redact


def refused_entity(exc: BaseException) -> str | None:
    """Why an entity refused us for good (missing, forbidden, sending not allowed), or None.

    Everything else is transient, for safety's sake: busy, timed out, unreachable, full, disabled,
    and a rejected credential (it fails every call alike; an operator fixes it, not a dead letter).

    The SDK raises a plain ``ServiceBusError`` for the ``amqp:not-allowed`` condition (e.g. a send to
    a subscription path); it says so in its message, which is the only place it is public.
    """
    if isinstance(exc, MessagingEntityNotFoundError):
        return "does not exist"
    if isinstance(exc, ServiceBusAuthorizationError):
        return "may not be sent to (unauthorised)"
    if type(exc) is ServiceBusError and "amqp:not-allowed" in str(exc):
        return "does not accept messages (not allowed)"
    return None


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise SDK errors as ours: :class:`TransientError`, or :class:`DependencyRefused` for a refusal."""
    try:
        yield
    except AzureError as exc:
        text = f"{what} failed: {type(exc).__name__}: {redact(str(exc))}"
        if refused_entity(exc) is not None:
            raise DependencyRefused(text) from None
        raise TransientError(text) from None
