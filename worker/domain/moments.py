"""Moments as the project writes them: one ISO 8601 form, in UTC with a ``Z`` suffix."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_iso(moment: datetime) -> str:
    """``2025-11-23T09:00:00Z``-style UTC text, microseconds kept only when present."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
