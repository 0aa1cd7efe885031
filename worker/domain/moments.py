"""Points in time as people type them and as the project writes them: one grammar, one format.

Every command that takes a time (``report --since``, ``dlq peek --since``, ``dlq replay --until``)
parses it with :func:`parse_moment`; every file and page that shows one writes it with :func:`utc_iso`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from worker.domain.errors import WorkerError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

#: The accepted forms, for help texts and error messages.
MOMENT_FORMS = "an ISO 8601 time (2025-11-23T09:00:00Z) or a duration back from now (30m, 2h, 7d, 1w)"


class MomentError(WorkerError, ValueError):
    """Text that is neither an ISO 8601 time nor a duration such as ``2h``."""


def parse_moment(text: str, now: datetime) -> datetime:
    """``2h``, ``30m``, ``7d``, ``1w`` (that long before ``now``) or an ISO 8601 time (naive means UTC)."""
    match = _DURATION.match(text)
    try:
        if match:
            return now - timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        moment = datetime.fromisoformat(text.strip())
        return as_utc(moment)
    except ValueError:
        raise MomentError(f"{text!r} is not {MOMENT_FORMS}") from None
    except OverflowError:  # 99999999999h, or 0001-01-01T00:00:00+00:01 (year 0 once in UTC)
        raise MomentError(f"{text!r} is outside the years 0001 to 9999 in UTC") from None


def as_utc(moment: datetime) -> datetime:
    """The same instant in UTC; a naive time is taken to be UTC already (as Kusto stores it)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utc_iso(moment: datetime) -> str:
    """``2025-11-23T09:00:00Z``-style UTC text, microseconds kept only when present."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
