"""The one time grammar of the allocation contract (``docs/allocation.md`` §2.6), and its instants.

``YYYY-MM-DDThh:mm:ss[.f{1,9}](Z|±hh:mm)`` — RFC 3339's profile of ISO 8601 with the zone required
(``t`` and ``z`` accepted too). A time is the instant it names floored to the microsecond (digits past
the sixth are dropped), as an integer of microseconds since 1970-01-01T00:00:00Z. Used for an
experiment's ``start_at``/``end_at``, for targeting operands and for targeting attributes, so the
configuration and the requests can never read one string two ways.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

#: The grammar as a JSON Schema ``pattern`` (ASCII digits only; a trailing newline is refused by the
#: schemas separately, since Python's ``$`` would let one through).
INSTANT_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
#: The longest string the grammar admits: ``2026-12-01T00:00:00.123456789+01:00``.
MAX_INSTANT_CHARS = 35
_INSTANT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_MICROSECOND = timedelta(microseconds=1)
_DAY_US = 86_400_000_000


def parse_instant(text: str) -> int | None:
    """Microseconds since the epoch of a time in the contract's grammar, or ``None`` when it is not one.

    Never raises for any string (hostile request context included): every malformed, impossible
    (February 30, 24:00, a leap second) or over-long string is simply not a time.
    """
    if len(text) > MAX_INSTANT_CHARS:
        return None
    match = _INSTANT.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    if year < 1 or hour > 23 or minute > 59 or second > 59:
        return None
    try:
        days = date(year, month, day).toordinal() - _EPOCH_DAY
    except ValueError:
        return None
    offset = 0
    if match[8] is not None:
        offset_hours, offset_minutes = int(match[9]), int(match[10])
        if offset_hours > 23 or offset_minutes > 59:
            return None
        offset = (offset_hours * 60 + offset_minutes) * 60 * (1 if match[8] == "+" else -1)
    fraction = int(((match[7] or "") + "000000")[:6])
    return (days * 86_400 + hour * 3_600 + minute * 60 + second - offset) * 1_000_000 + fraction


def instant_of_datetime(value: datetime) -> int | None:
    """Microseconds since the epoch of an aware ``datetime`` (as YAML reads an unquoted time), else ``None``."""
    if value.utcoffset() is None:
        return None
    return (value - EPOCH) // _MICROSECOND


def datetime_of_instant(micros: int) -> datetime:
    """The instant as an aware UTC ``datetime``."""
    return EPOCH + timedelta(microseconds=micros)


def format_instant(micros: int) -> str:
    """The canonical form ``YYYY-MM-DDThh:mm:ss.ffffffZ`` (UTC, always six fraction digits)."""
    moment = datetime_of_instant(micros)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
        f"{moment.second:02d}.{moment.microsecond:06d}Z"
    )


def instant_problem(value: object) -> str | None:
    """Why ``value`` is not a time of the contract (a string in its grammar, or an aware datetime), or ``None``."""
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            return "has no time zone: write Z or an offset such as +01:00"
        return _range_problem(value)
    if isinstance(value, date):
        return "is a date without a time and a zone: write e.g. 2026-12-01T00:00:00Z"
    if not isinstance(value, str):
        return f"must be a time such as 2026-12-01T00:00:00Z, got {type(value).__name__}"
    if parse_instant(value) is None:
        return "is not a time of the form 2026-12-01T00:00:00Z (a real date and time, with Z or an offset like +01:00)"
    return _range_problem(value)


#: The instants a configured time may name: those a UTC ``datetime`` (and the canonical form) can hold.
_FIRST_US = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // _MICROSECOND
_LAST_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // _MICROSECOND


def _range_problem(value: str | datetime) -> str | None:
    # 0001-01-01T00:00:00+01:00 is in the grammar but falls in year 0 in UTC, where neither a datetime
    # nor the canonical UTC form of docs/allocation.md §2.8 can go: a configuration error, not a crash.
    micros = instant_of(value)
    if micros is not None and not _FIRST_US <= micros <= _LAST_US:
        return "is outside the years 0001 to 9999 once converted to UTC: write it in UTC (with Z)"
    return None


def instant_of(value: object) -> int | None:
    """Microseconds since the epoch of a string in the grammar or an aware datetime; ``None`` otherwise."""
    if isinstance(value, str):
        return parse_instant(value)
    if isinstance(value, datetime):
        return instant_of_datetime(value)
    return None
