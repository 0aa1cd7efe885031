"""The balance checks of a cohort assignment: arm shares, every segment in every arm, members per cell.

A failed check is reported with the cells at fault, never "fixed" by re-drawing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from worker.domain.cohort.records import CohortRecord
from worker.domain.plural import counted

DEFAULT_TOLERANCE = 0.05
DEFAULT_MIN_PER_CELL = 5
#: Cells named in a check's ``detail`` text; ``offending_cells`` keeps all of them.
MAX_NAMED_CELLS = 20


@dataclass(frozen=True, slots=True)
class Cell:
    """A segment × arm cell of the count table; ``segment`` is ``None`` for a whole arm."""

    arm: str
    segment: str | None
    count: int

    def label(self) -> str:
        """``"New Customer × control"``, or the arm id for a whole arm."""
        return self.arm if self.segment is None else f"{self.segment} × {self.arm}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {"segment": self.segment, "arm": self.arm, "count": self.count}


@dataclass(frozen=True, slots=True)
class BalanceTable:
    """Segment × arm member counts with row and column totals, as in the document's table."""

    segments: tuple[str, ...]
    arms: tuple[str, ...]
    #: ``counts[segment][arm]``.
    counts: Mapping[str, Mapping[str, int]]
    row_totals: Mapping[str, int]
    column_totals: Mapping[str, int]
    total: int

    @classmethod
    def from_counts(cls, arms: Sequence[str], counts: Mapping[str, Mapping[str, int]]) -> BalanceTable:
        """Build the table (segments sorted) from ``{segment: {arm: count}}``; missing cells are 0."""
        segments = tuple(sorted(counts))
        full = {s: {a: counts[s].get(a, 0) for a in arms} for s in segments}
        rows = {s: sum(full[s].values()) for s in segments}
        columns = {a: sum(full[s][a] for s in segments) for a in arms}
        return cls(segments, tuple(arms), full, rows, columns, sum(rows.values()))

    @classmethod
    def from_records(cls, records: Iterable[CohortRecord], arms: Sequence[str]) -> BalanceTable:
        """Count an existing assignment, e.g. one read back from a file."""
        counts: dict[str, dict[str, int]] = {}
        for record in records:
            row = counts.setdefault(record.segment, {})
            row[record.experiment_arm] = row.get(record.experiment_arm, 0) + 1
        return cls.from_counts(arms, counts)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {
            "segments": list(self.segments),
            "arms": list(self.arms),
            "counts": {s: dict(self.counts[s]) for s in self.segments},
            "row_totals": dict(self.row_totals),
            "column_totals": dict(self.column_totals),
            "total": self.total,
        }


@dataclass(frozen=True, slots=True)
class BalanceCheck:
    """One balance check: whether it passed, a sentence saying why, and the cells at fault."""

    name: str
    passed: bool
    detail: str
    offending_cells: tuple[Cell, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "offending_cells": [cell.to_dict() for cell in self.offending_cells],
        }


@dataclass(frozen=True, slots=True)
class BalanceReport:
    """Every balance check run on an assignment, with the table they were run on."""

    table: BalanceTable
    target_shares: Mapping[str, Fraction]
    tolerance: float
    min_per_cell: int
    checks: tuple[BalanceCheck, ...]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "min_per_cell": self.min_per_cell,
            "target_shares": {arm: float(s) for arm, s in self.target_shares.items()},
            "checks": [check.to_dict() for check in self.checks],
            "table": self.table.to_dict(),
        }


def _percent(value: Fraction | float) -> str:
    return f"{float(value) * 100:.1f}%"


def _named(cells: Sequence[Cell], describe: Callable[[Cell], str]) -> str:
    text = ", ".join(describe(cell) for cell in cells[:MAX_NAMED_CELLS])
    hidden = len(cells) - MAX_NAMED_CELLS
    return text + (f" and {hidden} more" if hidden > 0 else "")


def _check_arm_shares(table: BalanceTable, target_shares: Mapping[str, Fraction], tolerance: float) -> BalanceCheck:
    limit = Fraction(repr(float(tolerance)))
    total = max(table.total, 1)

    def share(arm: str) -> Fraction:
        return Fraction(table.column_totals[arm], total)

    def describe(cell: Cell) -> str:
        return f"{cell.arm} {_percent(share(cell.arm))} (target {_percent(target_shares[cell.arm])})"

    cells = [Cell(arm, None, table.column_totals[arm]) for arm in table.arms]
    bad = [cell for cell in cells if abs(share(cell.arm) - target_shares[cell.arm]) > limit]
    band = f"±{float(tolerance) * 100:g} pp"
    if bad:
        their = "its" if len(bad) == 1 else "their"
        detail = f"{counted(len(bad), 'arm')} outside {band} of {their} target share: {_named(bad, describe)}"
    else:
        detail = f"every arm within {band} of its target share: {_named(cells, describe)}"
    return BalanceCheck("arm_share_within_tolerance", not bad, detail, tuple(bad))


def _cells(table: BalanceTable) -> list[Cell]:
    return [Cell(a, s, table.counts[s][a]) for s in table.segments for a in table.arms]


def _check_representation(table: BalanceTable) -> BalanceCheck:
    empty = [cell for cell in _cells(table) if cell.count == 0]
    if empty:
        detail = f"{counted(len(empty), 'segment × arm cell')} empty: {_named(empty, Cell.label)}"
    else:
        detail = f"all {counted(len(table.segments), 'segment')} represented in all {counted(len(table.arms), 'arm')}"
    return BalanceCheck("segments_in_every_arm", not empty, detail, tuple(empty))


def _check_min_per_cell(table: BalanceTable, min_per_cell: int) -> BalanceCheck:
    cells = _cells(table)
    small = [cell for cell in cells if cell.count < min_per_cell]

    def describe(cell: Cell) -> str:
        return f"{cell.label()} = {cell.count}"

    if small:
        detail = (
            f"{counted(len(small), 'cell')} below the minimum of {counted(min_per_cell, 'member')} per segment per"
            f" arm: {_named(small, describe)}"
        )
    else:
        smallest = min(cells, key=lambda cell: cell.count, default=None)
        least = f" (smallest: {describe(smallest)})" if smallest else ""
        detail = f"every segment × arm cell has at least {counted(min_per_cell, 'member')}{least}"
    return BalanceCheck("min_members_per_cell", not small, detail, tuple(small))


def check_balance(
    table: BalanceTable,
    target_shares: Mapping[str, Fraction],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    min_per_cell: int = DEFAULT_MIN_PER_CELL,
) -> BalanceReport:
    """Run the document's three checks on a count table; report, never repair."""
    checks = (
        _check_arm_shares(table, target_shares, tolerance),
        _check_representation(table),
        _check_min_per_cell(table, min_per_cell),
    )
    return BalanceReport(table, dict(target_shares), tolerance, min_per_cell, checks)
