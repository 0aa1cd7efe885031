"""Counting recorded assignments for the SRM report: rows checked, deduplicated, filtered and bucketed.

Rows (dicts with the :class:`~schemas.models.AssignmentRecord` columns) are checked column by column
(:func:`parse_row`), deduplicated by ``EventId`` (a redelivered request records an identical row)
and filtered by experiment and by ``AssignedAt`` (``since`` inclusive, ``until`` exclusive). What the
Kusto query returns is already summarised: :meth:`Tally.add_cell` counts it at the same grain.

Allocation (issue 18, docs/allocation.md) gives every row ``InExperiment``, ``Reason`` and
``ConfigVersion``. Only rows in the experiment go into the cells the SRM test reads; every row in the
window, counted or not, is also tallied by reason (:attr:`Tally.reasons`), and the counted ones by the
configuration that decided them (:attr:`Tally.configurations`). Rows written before allocation carry
none of the three (files from ``run --rows``; Kusto rows ingested before the columns were added read
null): every such row was a seed-rule or cohort assignment, so it is **in** the experiment, with
the reason :data:`BEFORE_ALLOCATION` and no configuration version.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from worker.domain.errors import WorkerError
from worker.domain.moments import as_utc

#: A split as a hashable value: ``((variant, share), ...)`` sorted by variant.
Split = tuple[tuple[str, float], ...]

#: The reason shown for a row written before allocation (no ``Reason`` column, or null/empty in Kusto).
#: Such a row is counted: the only assignments then were the seed rule's and the cohorts'. The label
#: says the row predates reasons rather than guessing ``bucketed``, so a window that straddles the
#: upgrade shows it. deploy/kusto/functions.kql labels them the same way.
BEFORE_ALLOCATION = "(before allocation)"

#: Longest ``Reason`` accepted (the contract's reasons are short words; a longer one is not a reason).
MAX_REASON_CHARS = 64


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
    #: Counted in the SRM test; ``True`` for a row written before allocation.
    in_experiment: bool = True
    #: Why the row was decided as it was (:data:`BEFORE_ALLOCATION` for a row written before allocation).
    reason: str = BEFORE_ALLOCATION
    #: The digest of the experiment's deciding configuration; ``""`` before allocation.
    config_version: str = ""


def _text(row: Mapping[str, object], column: str, *, required: bool = True) -> str:
    value = row.get(column)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ReportInputError(f"column {column} must be a non-empty string, got {value!r}")
    return value


def _moment(value: object) -> datetime:
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, str):
        try:
            return as_utc(datetime.fromisoformat(value))
        except ValueError:
            pass
    raise ReportInputError(f"column AssignedAt must be an ISO 8601 time, got {value!r}")


def parse_split(value: object) -> Split:
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


def in_experiment_of(value: object) -> bool:
    """An ``InExperiment`` value: ``true``/``false``, or missing/null (a row from before allocation: ``true``)."""
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ReportInputError(f"column InExperiment must be true, false or null, got {value!r}")
    return value


def reason_of(value: object) -> str:
    """A ``Reason`` value as shown: the reason, or :data:`BEFORE_ALLOCATION` when missing, null or empty."""
    if value is None or value == "":
        return BEFORE_ALLOCATION
    if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
        raise ReportInputError(
            f"column Reason must be a reason of at most {MAX_REASON_CHARS} characters, got {value!r}"
        )
    return value


def parse_row(row: object) -> AssignmentRow:
    """Check and pick the report's columns from one row; :class:`ReportInputError` names the bad column.

    ``InExperiment``, ``Reason`` and ``ConfigVersion`` may be missing (a row written before allocation);
    a row outside the experiment must say why (a ``Reason``), as every row the worker writes does.
    """
    if not isinstance(row, Mapping):
        raise ReportInputError(f"a row must be a JSON object, got {type(row).__name__}")
    in_experiment = in_experiment_of(row.get("InExperiment"))
    reason = reason_of(row.get("Reason"))
    if not in_experiment and reason == BEFORE_ALLOCATION:
        raise ReportInputError("column Reason must say why a row with InExperiment false is not counted, got none")
    return AssignmentRow(
        event_id=_text(row, "EventId"),
        assigned_at=_moment(row.get("AssignedAt")),
        experiment_id=_text(row, "ExperimentId"),
        variant_id=_text(row, "VariantId"),
        segment=_text(row, "Segment", required=False),
        split=parse_split(row.get("SplitRatio")),
        in_experiment=in_experiment,
        reason=reason,
        config_version=_text(row, "ConfigVersion", required=False),
    )


# --- counting -------------------------------------------------------------------------------------

#: ``(experiment, segment, variant, split, hour)``: the grain everything is counted at.
CellKey = tuple[str, str, str, Split, datetime]


#: ``(experiment, in_experiment, reason)``: how rows are tallied by reason.
ReasonKey = tuple[str, bool, str]


@dataclass(slots=True)
class _Cell:
    count: int = 0
    last_seen: datetime | None = None


@dataclass(slots=True)
class Seen:
    """How many rows, and from when to when (the span of their ``AssignedAt``)."""

    count: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def add(self, count: int, first: datetime, last: datetime) -> None:
        """Count ``count`` more rows assigned between ``first`` and ``last``."""
        self.count += count
        self.first = first if self.first is None else min(self.first, first)
        self.last = last if self.last is None else max(self.last, last)


class Tally:
    """Counts rows into cells, dropping duplicate ``EventId``s and rows outside the window.

    Only rows in the experiment reach the cells (and so the SRM test and the hourly series); every
    row in the window is also counted in :attr:`reasons`, and the counted ones in :attr:`configurations`.
    """

    def __init__(self, window: Window | None = None) -> None:
        self.window = window or Window()
        self.rows_read = 0
        self.duplicates = 0
        self.excluded = 0
        #: Every experiment id in the rows read, inside the window or not (to name them on a typo).
        self.experiments_seen: set[str] = set()
        #: Rows in the window by ``(experiment, in_experiment, reason)``, then by variant.
        self.reasons: dict[ReasonKey, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        #: Rows counted in the experiment, by experiment and ``ConfigVersion`` (``""`` before allocation).
        self.configurations: dict[str, dict[str, Seen]] = defaultdict(lambda: defaultdict(Seen))
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
        self.add_cell(
            row.experiment_id,
            row.segment,
            row.variant_id,
            row.split,
            row.assigned_at,
            count=1,
            in_experiment=row.in_experiment,
            reason=row.reason,
            config_version=row.config_version,
        )

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
        first_seen: datetime | None = None,
        in_experiment: bool = True,
        reason: str = BEFORE_ALLOCATION,
        config_version: str = "",
    ) -> None:
        """Count ``count`` already-deduplicated, already-filtered rows (a Kusto ``summarize`` row).

        ``assigned_at`` picks the hour bucket; ``last_seen`` (default ``assigned_at``) dates the split;
        ``first_seen`` (default ``assigned_at``) and ``last_seen`` date the configuration. Rows not in
        the experiment are tallied by reason only: they never reach the cells the SRM test reads.
        """
        self.reasons[(experiment, in_experiment, reason)][variant] += count
        if not in_experiment:
            return
        last = as_utc(last_seen or assigned_at)
        self.configurations[experiment][config_version].add(count, as_utc(first_seen or assigned_at), last)
        cell = self._cells[(experiment, segment, variant, split, hour_of(as_utc(assigned_at)))]
        cell.count += count
        if cell.last_seen is None or last > cell.last_seen:
            cell.last_seen = last

    def cells(self) -> Iterable[tuple[CellKey, int, datetime | None]]:
        """Every cell: its key, its count and the latest assignment time in it."""
        return ((key, cell.count, cell.last_seen) for key, cell in self._cells.items())

    @property
    def counted(self) -> int:
        """Rows counted into cells (in the experiment)."""
        return sum(cell.count for cell in self._cells.values())

    @property
    def not_in_experiment(self) -> int:
        """Rows in the window that are not in their experiment (served, never counted)."""
        return sum(sum(variants.values()) for (_, inside, _), variants in self.reasons.items() if not inside)


def tally_rows(rows: Iterable[Mapping[str, object]], window: Window | None = None) -> Tally:
    """Parse and count every row; the first malformed one raises :class:`ReportInputError`."""
    tally = Tally(window)
    for row in rows:
        tally.add_row(parse_row(row))
    return tally
