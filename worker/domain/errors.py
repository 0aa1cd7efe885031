"""One root for every error the worker raises.

Errors split two ways, and the pump settles a message by which side its error is on:

* :class:`PermanentError` — retrying cannot help (bad bytes, bad schema, unknown experiment). The
  message is dead-lettered with :attr:`PermanentError.reason` as ``DeadLetterReason`` and a precise,
  length-bounded description.
* :class:`TransientError` — a dependency is unavailable (event topic, Kusto). The message is not
  completed, so the broker redelivers it; nothing is dead-lettered for a downstream outage.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import StrEnum

from worker.domain.plural import counted

#: Descriptions go into broker properties, logs and telemetry: bound them so one huge bad value
#: cannot bloat every place it is copied to.
MAX_DESCRIPTION_CHARS = 1024


class DeadLetterReason(StrEnum):
    """Reason codes written to ``DeadLetterReason``; ``docs/operations.md`` ("Dead-letter reasons") explains each."""

    INVALID_JSON = "InvalidJson"
    SCHEMA_VALIDATION_FAILED = "SchemaValidationFailed"
    UNKNOWN_EXPERIMENT = "UnknownExperiment"
    MESSAGE_TOO_LARGE = "MessageTooLarge"
    COHORT_TOO_LARGE = "CohortTooLarge"
    INVALID_COHORT = "InvalidCohort"
    REPLY_UNDELIVERABLE = "ReplyUndeliverable"
    EVENT_TOO_LARGE = "EventTooLarge"


def truncate(text: str, limit: int = MAX_DESCRIPTION_CHARS) -> str:
    """Cut ``text`` to ``limit`` characters, saying how much was dropped."""
    if len(text) <= limit:
        return text
    suffix = f"… [{len(text) - limit} more characters]"
    return text[: max(0, limit - len(suffix))] + suffix


class WorkerError(Exception):
    """Root of every error raised by the worker."""


class UsageError(WorkerError):
    """Bad command-line flags or input files; printed without a traceback, exit status 2."""


class ConfigurationError(WorkerError, ValueError):
    """A configuration file or setting is invalid; the message names the file and field."""


class UnknownExperimentError(WorkerError, LookupError):
    """An experiment id that the registry does not hold; the message lists the ones it does."""

    def __init__(self, experiment_id: str, source: str, configured: list[str]) -> None:
        self.experiment_id = experiment_id
        shown = ", ".join(repr(name) for name in configured[:20])
        more = f" and {len(configured) - 20} more" if len(configured) > 20 else ""
        super().__init__(
            f"experiment {experiment_id!r:.80} is not configured in {source}; configured: {shown or 'none'}{more}"
        )


class SplitRatioError(WorkerError, ValueError):
    """Split ratios are empty, negative, not numbers, or do not sum to 1.0."""


class UnsupportedStrategyError(WorkerError, ValueError):
    """A strategy was asked for that a stateless, deterministic worker cannot honour."""


class PermanentError(WorkerError):
    """The message can never be processed; it is dead-lettered with a reason and description."""

    def __init__(self, reason: DeadLetterReason, description: str) -> None:
        self.reason = reason
        self.description = truncate(description)
        super().__init__(f"{reason}: {self.description}")


class DecodeError(PermanentError):
    """The body is not UTF-8 JSON. Keeps the raw bytes, as dramatiq's ``DecodeError`` does."""

    def __init__(self, data: bytes, description: str) -> None:
        self.data = data
        super().__init__(DeadLetterReason.INVALID_JSON, description)


class TransientError(WorkerError):
    """A dependency failed in a way that may pass; the message must be redelivered, not dropped."""


class DependencyRefused(WorkerError):
    """A dependency refused a call for good (an entity missing, access denied); retrying will not help.

    Raised by adapters for calls that are not about one message, such as the command line's publish
    and dead-letter commands; a refusal caused by one message is a :class:`PermanentError` instead.
    """


class PublishRejected(WorkerError):
    """Some events were refused for good; every event not named in :attr:`rejected` was accepted.

    Raised by ``EventPublisher.publish`` when an event can never be delivered (its reply entity does
    not exist or may not be sent to, or it is larger than the entity accepts). ``rejected`` maps the
    refused events' ``message_id`` to the :class:`PermanentError` that dead-letters their request.
    ``reached_topic`` names the refused events the topic had accepted before the refusal (a reply
    that failed after its event went out): subscribers have them, so the pump records their rows
    before it dead-letters the request. The pump never publishes the accepted events again.
    """

    def __init__(self, rejected: Mapping[str, PermanentError], reached_topic: Collection[str] = ()) -> None:
        self.rejected = dict(rejected)
        self.reached_topic = frozenset(reached_topic) & self.rejected.keys()
        super().__init__(
            f"{counted(len(self.rejected), 'event')} refused: " + "; ".join(str(e) for e in self.rejected.values())
        )
