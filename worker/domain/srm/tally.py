"""Counting recorded assignments for the SRM report: rows checked, deduplicated, filtered and bucketed.

Rows (dicts with the :class:`~schemas.models.AssignmentRecord` columns) are checked column by column
(:func:`parse_row`), deduplicated by ``EventId`` (a redelivered request records an identical row)
and filtered by experiment and by ``AssignedAt`` (``since`` inclusive, ``until`` exclusive). What the
Kusto query returns is already summarised: :meth:`Tally.add_cell` counts it at the same grain.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.domain.errors import WorkerError
from worker.domain.moments import as_utc

#: A split as a hashable value: ``((variant, share), ...)`` sorted by variant.
Split = tuple[tuple[str, float], ...]


class ReportInputError(WorkerError, ValueError):
    """A row, a split or a time given to the report is malformed; the message names the column or value."""


# --- time -----------------------------------------------------------------------------------------


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour holding ``moment`` (the time-series bucket)."""
    return moment.replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Window:
    """Which rows the report counts: one experiment or all, and ``since <= AssignedAt < until``."""

    experiment: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def admits(self, experiment: str, assigned_at: datetime) -> bool:
        """Whether a row of ``experiment`` assigned at ``assigned_at`` is in the window."""
        if self.experiment is not None and experiment != self.experiment:
            return False
        if self.since is not None and assigned_at < self.since:
            return False
        return self.until is None or assigned_at < self.until


# --- rows -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssignmentRow:
    """The columns of an ``AssignmentEvents`` row that the report uses."""

    event_id: str
    assigned_at: datetime
    experiment_id: str
    variant_id: str
    segment: str
    split: Split


def _text(row: Mapping[str, Any], column: str, *, required: bool = True) -> str:
    value = row.get(column)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ReportInputError(f"column {column} must be a non-empty string, got {value!r}")
    return value


def _moment(value: Any) -> datetime:
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, str):
        try:
            return as_utc(datetime.fromisoformat(value))
        except ValueError:
            pass
    raise ReportInputError(f"column AssignedAt must be an ISO 8601 time, got {value!r}")


def parse_split(value: Any) -> Split:
    """A ``SplitRatio`` value — a JSON object, or its text as Kusto's ``tostring`` gives it — as a :data:`Split`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ReportInputError(f"column SplitRatio is not a JSON object: {value!r}") from None
    if not isinstance(value, Mapping) or not value:
        raise ReportInputError(f"column SplitRatio must be a non-empty object of variant -> share, got {value!r}")
    shares: list[tuple[str, float]] = []
    for variant, share in value.items():
        number = isinstance(share, int | float) and not isinstance(share, bool)
        if not isinstance(variant, str) or not number or not math.isfinite(share) or share < 0:
            raise ReportInputError(
                f"column SplitRatio: share of {variant!r} must be a finite number >= 0, got {share!r}"
            )
        shares.append((variant, float(share)))
    return tuple(sorted(shares))


def parse_row(row: Mapping[str, Any]) -> AssignmentRow:
    """Check and pick the report's columns from one row; :class:`ReportInputError` names the bad column."""
    if not isinstance(row, Mapping):
        raise ReportInputError(f"a row must be a JSON object, got {type(row).__name__}")
    return AssignmentRow(
        event_id=_text(row, "EventId"),
        assigned_at=_moment(row.get("AssignedAt")),
        experiment_id=_text(row, "ExperimentId"),
        variant_id=_text(row, "VariantId"),
        segment=_text(row, "Segment", required=False),
        split=parse_split(row.get("SplitRatio")),
    )


# --- counting -------------------------------------------------------------------------------------

#: ``(experiment, segment, variant, split, hour)``: the grain everything is counted at.
CellKey = tuple[str, str, str, Split, datetime]


@dataclass(slots=True)
class _Cell:
    count: int = 0
    last_seen: datetime | None = None


class Tally:
    """Counts rows into cells, dropping duplicate ``EventId``s and rows outside the window."""

    def __init__(self, window: Window | None = None) -> None:
        self.window = window or Window()
        self.rows_read = 0
        self.duplicates = 0
        self.excluded = 0
        #: Every experiment id in the rows read, inside the window or not (to name them on a typo).
        self.experiments_seen: set[str] = set()
        self._seen: set[str] = set()
        self._cells: dict[CellKey, _Cell] = defaultdict(_Cell)

    def add_row(self, row: AssignmentRow) -> None:
        """Count one row (unless its ``EventId`` was counted already or it is outside the window)."""
        self.rows_read += 1
        if row.event_id in self._seen:
            self.duplicates += 1
            return
        self._seen.add(row.event_id)
        self.experiments_seen.add(row.experiment_id)
        if not self.window.admits(row.experiment_id, row.assigned_at):
            self.excluded += 1
            return
        self.add_cell(row.experiment_id, row.segment, row.variant_id, row.split, row.assigned_at, count=1)

    def add_cell(
        self,
        experiment: str,
        segment: str,
        variant: str,
        split: Split,
        assigned_at: datetime,
        *,
        count: int,
        last_seen: datetime | None = None,
    ) -> None:
        """Count ``count`` already-deduplicated, already-filtered rows (a Kusto ``summarize`` row).

        ``assigned_at`` picks the hour bucket; ``last_seen`` (default ``assigned_at``) dates the split.
        """
        cell = self._cells[(experiment, segment, variant, split, hour_of(as_utc(assigned_at)))]
        cell.count += count
        seen = as_utc(last_seen or assigned_at)
        if cell.last_seen is None or seen > cell.last_seen:
            cell.last_seen = seen

    def cells(self) -> Iterable[tuple[CellKey, int, datetime | None]]:
        """Every cell: its key, its count and the latest assignment time in it."""
        return ((key, cell.count, cell.last_seen) for key, cell in self._cells.items())

    @property
    def counted(self) -> int:
        """Rows counted into cells."""
        return sum(cell.count for cell in self._cells.values())


def tally_rows(rows: Iterable[Mapping[str, Any]], window: Window | None = None) -> Tally:
    """Parse and count every row; the first malformed one raises :class:`ReportInputError`."""
    tally = Tally(window)
    for row in rows:
        tally.add_row(parse_row(row))
    return tally
