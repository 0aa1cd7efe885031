"""Cohort stratified assignment with balance checks (``docs/seeds/experiment_assignment_strategy.md``).

The rule, precise enough to re-implement in any language:

1. Group members by segment. Segments are processed, and reported, in sorted (code point) order.
2. Within a segment, order members by ``md5(f"{seed}:{experiment_id}:{member_id}")`` — the 16-byte
   digest of the UTF-8 key, compared as unsigned bytes — breaking ties by member id. ``seed`` is
   formatted with ``str()``: the default ``42`` hashes as ``"42"``. The order depends only on
   (seed, experiment, member), so the same *set* of members gives the same assignment whatever
   order the rows arrive in.
3. Cut the ordered segment into consecutive runs, one per arm, in the order the arms are listed.
   Run sizes are the segment's largest-remainder (Hamilton) apportionment over the arm weights,
   remainder ties going to the earlier arm. With equal weights that is exactly the document's
   code: every arm gets ``n // k`` and the first ``n % k`` arms one more.
4. Check the balance and report every check. A failed check is reported, never "fixed".

Where this departs from the document, and why:

* **The extra members go to the first arms.** The document's table gives the leftover member of
  Standard (145) and New Customer (21) to the *last* arm (treatment_3: 37 and 6, totals
  62/62/62/64), but its own code (``1 if i < remainder else 0``) gives them to the *first* arms:
  control gets 37 and 6, totals 64/62/62/62. The code is followed; the table is wrong.
* **Hash order, not ``random.shuffle``.** ``random.seed(42); random.shuffle(...)`` depends on the
  order rows arrive in, on every earlier shuffle, and on CPython's Mersenne Twister; an MD5 rank
  depends on nothing but the member, so any language reproduces it.
* **Tolerance is absolute.** The document says both "25% ± 5%" and "23-27%"; the default here is
  ±0.05 absolute (20-30% for four equal arms), configurable.
* **No re-randomising.** The document says to re-randomise or adjust when a check fails.
  Re-drawing until the checks pass makes the assignment depend on the checks, breaks
  reproducibility and the randomisation the analysis relies on; a failure is reported instead.
* **One timestamp per run** instead of ``datetime.utcnow()`` per record (injectable for tests).

Fast path: digests are computed in C-level ``map`` chains and ordered with one ``numpy.lexsort``;
a 1,000,000-member cohort takes about 1.5 s, 4.5 s with CSV read and write (``bench/bench_stratify.py``).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from itertools import chain, repeat
from typing import Any, Protocol, overload

import numpy as np

from schemas.text import refused_character
from worker.domain.assignment import digest as _digest
from worker.domain.assignment import md5 as _md5
from worker.domain.errors import WorkerError
from worker.domain.moments import utc_iso

DEFAULT_SEED = 42
DEFAULT_TOLERANCE = 0.05
DEFAULT_MIN_PER_CELL = 5
ASSIGNMENT_METHOD = "stratified_random"
#: Problems shown in an error message; :attr:`CohortInputError.problems` keeps all of them.
MAX_SHOWN_PROBLEMS = 50
#: Cells named in a check's ``detail`` text; ``offending_cells`` keeps all of them.
MAX_NAMED_CELLS = 20


class CohortInputError(WorkerError, ValueError):
    """The cohort or the arm configuration is invalid; :attr:`problems` lists every problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        shown = "\n".join(f"  - {problem}" for problem in self.problems[:MAX_SHOWN_PROBLEMS])
        hidden = len(self.problems) - MAX_SHOWN_PROBLEMS
        if hidden > 0:
            shown += f"\n  … and {hidden} more"
        super().__init__(f"{len(self.problems)} problem(s) with the cohort input:\n{shown}")


@dataclass(frozen=True, slots=True)
class Member:
    """One cohort member: an id unique in the cohort and the segment it is stratified by."""

    member_id: str
    segment: str


class SegmentedMember(Protocol):
    """Anything with ``member_id`` and ``segment`` attributes (such as :class:`Member`)."""

    @property
    def member_id(self) -> str: ...

    @property
    def segment(self) -> str: ...


MemberLike = tuple[str, str] | SegmentedMember
Weight = float | Fraction | Decimal


@dataclass(frozen=True, slots=True)
class Arm:
    """An experiment arm: its id, optional relative weight, optional variant per segment."""

    id: str
    #: Relative weight; all arms weighted, or none (equal split). Normalised by their sum.
    weight: Weight | None = None
    #: ``{segment: variant_id}``, e.g. a tone per segment; unnamed segments get the arm id.
    variants_by_segment: Mapping[str, str] | None = None

    def variant_for(self, segment: str) -> str:
        """The variant a member of ``segment`` in this arm receives."""
        if self.variants_by_segment is None:
            return self.id
        return self.variants_by_segment.get(segment, self.id)


@dataclass(frozen=True, slots=True)
class CohortRecord:
    """One member's assignment, with everything needed to audit or reproduce it."""

    customer_id: str
    segment: str
    experiment_arm: str
    variant_id: str
    assigned_at: datetime
    assignment_method: str
    seed: str
    experiment_id: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready fields; ``assigned_at`` as ISO 8601 UTC with a ``Z``."""
        return {
            "customer_id": self.customer_id,
            "segment": self.segment,
            "experiment_arm": self.experiment_arm,
            "variant_id": self.variant_id,
            "assigned_at": utc_iso(self.assigned_at),
            "assignment_method": self.assignment_method,
            "seed": self.seed,
            "experiment_id": self.experiment_id,
        }


RECORD_FIELDS: tuple[str, ...] = (
    "customer_id",
    "segment",
    "experiment_arm",
    "variant_id",
    "assigned_at",
    "assignment_method",
    "seed",
    "experiment_id",
)


class CohortRecords(Sequence[CohortRecord]):
    """The records of one run, stored as columns; :class:`CohortRecord` objects are built on access.

    A million frozen dataclasses take seconds to build and most callers only stream them to a
    file: :meth:`rows` yields plain tuples straight from the columns.
    """

    __slots__ = ("arms", "assigned_at", "experiment_id", "member_ids", "seed", "segments", "variants")

    def __init__(
        self,
        member_ids: list[str],
        segments: list[str],
        arms: list[str],
        variants: list[str],
        *,
        assigned_at: datetime,
        seed: str,
        experiment_id: str,
    ) -> None:
        self.member_ids = member_ids
        self.segments = segments
        self.arms = arms
        self.variants = variants
        self.assigned_at = assigned_at
        self.seed = seed
        self.experiment_id = experiment_id

    def __len__(self) -> int:
        return len(self.member_ids)

    @overload
    def __getitem__(self, index: int) -> CohortRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[CohortRecord]: ...

    def __getitem__(self, index: int | slice) -> CohortRecord | list[CohortRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return CohortRecord(
            self.member_ids[index],
            self.segments[index],
            self.arms[index],
            self.variants[index],
            self.assigned_at,
            ASSIGNMENT_METHOD,
            self.seed,
            self.experiment_id,
        )

    def __iter__(self) -> Iterator[CohortRecord]:
        return map(
            CohortRecord,
            self.member_ids,
            self.segments,
            self.arms,
            self.variants,
            repeat(self.assigned_at),
            repeat(ASSIGNMENT_METHOD),
            repeat(self.seed),
            repeat(self.experiment_id),
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CohortRecords):
            return self._columns() == other._columns()
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def _columns(self) -> tuple[object, ...]:
        return (
            self.member_ids,
            self.segments,
            self.arms,
            self.variants,
            self.assigned_at,
            self.seed,
            self.experiment_id,
        )

    def rows(self) -> Iterator[tuple[str, ...]]:
        """One tuple of strings per record, in :data:`RECORD_FIELDS` order (for CSV writers)."""
        return zip(
            self.member_ids,
            self.segments,
            self.arms,
            self.variants,
            repeat(utc_iso(self.assigned_at)),
            repeat(ASSIGNMENT_METHOD),
            repeat(self.seed),
            repeat(self.experiment_id),
        )


@dataclass(frozen=True, slots=True)
class Cell:
    """A segment × arm cell of the count table; ``segment`` is ``None`` for a whole arm."""

    arm: str
    segment: str | None
    count: int

    def label(self) -> str:
        """``"New Customer × control"``, or the arm id for a whole arm."""
        return self.arm if self.segment is None else f"{self.segment} × {self.arm}"

    def to_dict(self) -> dict[str, Any]:
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

    def to_dict(self) -> dict[str, Any]:
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

    def to_dict(self) -> dict[str, Any]:
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "min_per_cell": self.min_per_cell,
            "target_shares": {arm: float(s) for arm, s in self.target_shares.items()},
            "checks": [check.to_dict() for check in self.checks],
            "table": self.table.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class CohortAssignment:
    """The result of :func:`stratify`: one record per member, and the balance report."""

    experiment_id: str
    seed: str
    assigned_at: datetime
    arms: tuple[Arm, ...]
    #: Ordered by segment (sorted), then arm (as listed), then hash rank.
    records: CohortRecords
    report: BalanceReport

    @property
    def passed(self) -> bool:
        """True when every balance check passed."""
        return self.report.passed

    def to_dict(self, *, include_records: bool = False) -> dict[str, Any]:
        """JSON-ready summary (the run, the arms, the balance report), optionally the records."""
        summary: dict[str, Any] = {
            "experiment_id": self.experiment_id,
            "seed": self.seed,
            "assigned_at": utc_iso(self.assigned_at),
            "assignment_method": ASSIGNMENT_METHOD,
            "members": len(self.records),
            "arms": [
                {
                    "id": arm.id,
                    "weight": None if arm.weight is None else float(arm.weight),
                    "target_share": float(self.report.target_shares[arm.id]),
                    "variants_by_segment": (None if arm.variants_by_segment is None else dict(arm.variants_by_segment)),
                }
                for arm in self.arms
            ],
            "balance": self.report.to_dict(),
        }
        if include_records:
            summary["records"] = [record.to_dict() for record in self.records]
        return summary


# --- apportionment -----------------------------------------------------------------------------


def apportion(total: int, weights: Sequence[Fraction]) -> list[int]:
    """Largest-remainder (Hamilton) split of ``total`` over ``weights``; ties to the earlier arm.

    Exact rational arithmetic, so equal remainders really are equal. With equal weights the first
    ``total % k`` arms get ``total // k + 1`` and the rest ``total // k``.
    """
    weight_sum = sum(weights, Fraction(0))
    quotas = [total * weight / weight_sum for weight in weights]
    sizes = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (sizes[i] - quotas[i], i))
    for index in by_remainder[: total - sum(sizes)]:
        sizes[index] += 1
    return sizes


def _as_fraction(weight: object) -> Fraction | None:
    """An exact, positive weight, or ``None`` when it is not one. Floats go through ``repr``."""
    if isinstance(weight, bool):
        return None
    try:
        if isinstance(weight, float):
            value = Fraction(repr(weight)) if math.isfinite(weight) else None
        elif isinstance(weight, int | Fraction | Decimal):
            value = Fraction(weight)
        else:
            value = None
    except (ValueError, OverflowError):  # Decimal NaN or infinity
        value = None
    return value if value is not None and value > 0 else None


# --- validation --------------------------------------------------------------------------------


def _arm_problems(arms: Sequence[Arm]) -> list[str]:
    problems: list[str] = []
    if not arms:
        return ["no arms: at least one arm is needed"]
    seen: set[str] = set()
    for position, arm in enumerate(arms):
        id_problem = value_problem(arm.id)
        if id_problem:
            problems.append(f"arms[{position}]: arm id: {id_problem}")
        elif arm.id in seen:
            problems.append(f"arms[{position}]: duplicate arm id {arm.id!r}")
        seen.add(arm.id)
        if arm.weight is not None and _as_fraction(arm.weight) is None:
            problems.append(f"arm {arm.id!r}: weight must be a finite number > 0, got {arm.weight!r}")
        problems.extend(_variant_problems(arm))
    weighted = [arm.weight is not None for arm in arms]
    if any(weighted) and not all(weighted):
        unweighted = [arm.id for arm in arms if arm.weight is None]
        problems.append(f"give every arm a weight or none: no weight for {unweighted}")
    return problems


def _variant_problems(arm: Arm) -> list[str]:
    if arm.variants_by_segment is None:
        return []
    if not isinstance(arm.variants_by_segment, Mapping):
        return [f"arm {arm.id!r}: variants_by_segment must be a mapping of segment to variant id"]
    return [
        f"arm {arm.id!r}: variant for segment {segment!r}: {value_problem(variant)}"
        for segment, variant in arm.variants_by_segment.items()
        if not isinstance(segment, str) or value_problem(variant)
    ]


def _blank(value: object) -> bool:
    return not isinstance(value, str) or not value.strip()


def value_problem(value: object) -> str | None:
    """Why ``value`` cannot be a member id or segment: empty, not a string, or a character the wire
    contract's rule refuses (:mod:`schemas.text`: controls, invisible and bidi characters, lone
    surrogates), named by code point."""
    if _blank(value):
        return f"empty or non-string {value!r}"
    text = str(value)
    match = refused_character(text)
    if match is None:
        return None
    character = match.group()
    if "\ud800" <= character <= "\udfff":
        return f"not encodable as UTF-8 (a lone surrogate?) {value!r}"
    kind = "control character" if unicodedata.category(character) == "Cc" else "invisible or bidi character"
    return f"{kind} {character!r} in {value!r}"


def has_bad_characters(text: str) -> bool:
    """True when ``text`` holds a character the wire contract's rule refuses."""
    return refused_character(text) is not None


def _member_problems(member_ids: Sequence[str], segments: Sequence[str]) -> list[str]:
    """Every problem with the members. The common, clean case runs in C (sets and ``map``)."""
    if not member_ids:
        return ["no members: the cohort is empty"]
    problems: list[str] = []
    clean = set(map(type, member_ids)) | set(map(type, segments)) == {str}
    clean = clean and all(map(str.strip, member_ids)) and all(map(str.strip, segments))
    # One regex pass over the joined text instead of one per value; per value only on a hit.
    if not clean or has_bad_characters("".join(member_ids) + "".join(set(segments))):
        for position, (member_id, segment) in enumerate(zip(member_ids, segments, strict=True)):
            for what, value in (("member id", member_id), ("segment", segment)):
                problem = value_problem(value)
                if problem:
                    problems.append(f"members[{position}]: {what}: {problem}")
    if len(set(member_ids)) != len(member_ids):
        first: dict[str, int] = {}
        for position, member_id in enumerate(member_ids):
            if member_id in first:
                problems.append(
                    f"members[{position}]: duplicate member id {member_id!r} (first at members[{first[member_id]}])"
                )
            else:
                first[member_id] = position
    return problems


def _settings_problems(experiment_id: object, seed: object, tolerance: object, min_per_cell: object) -> list[str]:
    problems = []
    experiment_problem = value_problem(experiment_id)
    if experiment_problem:
        problems.append(f"experiment id: {experiment_problem}")
    if isinstance(seed, bool) or not isinstance(seed, str | int) or value_problem(str(seed)):
        problems.append(f"seed must be an integer or a non-empty string without control characters, got {seed!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance <= 1:
        problems.append(f"tolerance must be a number from 0 to 1, got {tolerance!r}")
    if isinstance(min_per_cell, bool) or not isinstance(min_per_cell, int) or min_per_cell < 0:
        problems.append(f"min_per_cell must be an integer >= 0, got {min_per_cell!r}")
    return problems


def _as_arm(arm: Arm | str) -> Arm:
    return arm if isinstance(arm, Arm) else Arm(arm)


def _timestamp(assigned_at: datetime | None, problems: list[str]) -> datetime:
    if assigned_at is None:
        return datetime.now(UTC)
    if not isinstance(assigned_at, datetime) or assigned_at.utcoffset() is None:
        problems.append(f"assigned_at must be a timezone-aware datetime, got {assigned_at!r}")
        return datetime.now(UTC)
    return assigned_at.astimezone(UTC)


# --- balance -----------------------------------------------------------------------------------


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
        detail = f"{len(bad)} arm(s) outside {band} of their target share: {_named(bad, describe)}"
    else:
        detail = f"every arm within {band} of its target share: {_named(cells, describe)}"
    return BalanceCheck("arm_share_within_tolerance", not bad, detail, tuple(bad))


def _cells(table: BalanceTable) -> list[Cell]:
    return [Cell(a, s, table.counts[s][a]) for s in table.segments for a in table.arms]


def _check_representation(table: BalanceTable) -> BalanceCheck:
    empty = [cell for cell in _cells(table) if cell.count == 0]
    if empty:
        detail = f"{len(empty)} segment × arm cell(s) empty: {_named(empty, Cell.label)}"
    else:
        detail = f"all {len(table.segments)} segment(s) represented in all {len(table.arms)} arm(s)"
    return BalanceCheck("segments_in_every_arm", not empty, detail, tuple(empty))


def _check_min_per_cell(table: BalanceTable, min_per_cell: int) -> BalanceCheck:
    cells = _cells(table)
    small = [cell for cell in cells if cell.count < min_per_cell]

    def describe(cell: Cell) -> str:
        return f"{cell.label()} = {cell.count}"

    if small:
        detail = (
            f"{len(small)} cell(s) below the minimum of {min_per_cell} members per segment per"
            f" arm: {_named(small, describe)}"
        )
    else:
        smallest = min(cells, key=lambda cell: cell.count, default=None)
        least = f" (smallest: {describe(smallest)})" if smallest else ""
        detail = f"every segment × arm cell has at least {min_per_cell} members{least}"
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


def target_shares(arms: Sequence[Arm]) -> dict[str, Fraction]:
    """Each arm's exact target share: ``1/k`` unweighted, else its weight over the weight sum."""
    weights = _weights(arms)
    weight_sum = sum(weights, Fraction(0))
    return {arm.id: weight / weight_sum for arm, weight in zip(arms, weights, strict=True)}


def _weights(arms: Sequence[Arm]) -> list[Fraction]:
    if all(arm.weight is None for arm in arms):
        return [Fraction(1)] * len(arms)
    return [_as_fraction(arm.weight) or Fraction(0) for arm in arms]


# --- ordering ----------------------------------------------------------------------------------


def hash_order(
    member_ids: Sequence[str], segment_codes: np.ndarray[Any, Any], seed: str, experiment_id: str
) -> list[int]:
    """Member positions ordered by segment code, then MD5 digest, then member id."""
    prefix = f"{seed}:{experiment_id}:".encode()
    digests = b"".join(map(_digest, map(_md5, map(prefix.__add__, map(str.encode, member_ids)))))
    return order_by_digest(digests, segment_codes, member_ids)


def order_by_digest(digests: bytes, segment_codes: np.ndarray[Any, Any], member_ids: Sequence[str]) -> list[int]:
    """Order positions by (segment code, 16-byte digest as unsigned bytes, member id).

    Two big-endian 64-bit words compare exactly as the bytes do. Equal digests for distinct ids
    (an MD5 collision) are re-ordered by member id.
    """
    words = np.frombuffer(digests, dtype=">u8").reshape(-1, 2)
    order = np.lexsort((words[:, 1], words[:, 0], segment_codes))
    ranked = words[order]
    codes = segment_codes[order]
    same = (codes[1:] == codes[:-1]) & (ranked[1:, 0] == ranked[:-1, 0]) & (ranked[1:, 1] == ranked[:-1, 1])
    positions: list[int] = order.tolist()
    for start in np.flatnonzero(same & ~np.concatenate(([False], same[:-1]))).tolist():
        end = start + 1
        while end < len(same) and same[end]:
            end += 1
        positions[start : end + 1] = sorted(positions[start : end + 1], key=member_ids.__getitem__)
    return positions


# --- the assignment ----------------------------------------------------------------------------


def _split_members(members: Iterable[MemberLike]) -> tuple[list[str], list[str]]:
    member_ids: list[str] = []
    segments: list[str] = []
    for member in members:
        if isinstance(member, tuple):
            member_id, segment = member
        else:
            member_id, segment = member.member_id, member.segment
        member_ids.append(member_id)
        segments.append(segment)
    return member_ids, segments


def stratify(
    members: Iterable[MemberLike],
    arms: Sequence[Arm | str],
    *,
    experiment_id: str,
    seed: str | int = DEFAULT_SEED,
    tolerance: float = DEFAULT_TOLERANCE,
    min_per_cell: int = DEFAULT_MIN_PER_CELL,
    assigned_at: datetime | None = None,
) -> CohortAssignment:
    """Assign a cohort to arms by stratified hash-ordered randomisation and check its balance.

    ``members`` are ``(member_id, segment)`` pairs or objects with those attributes. Raises
    :class:`CohortInputError` listing every problem with the input; balance failures do not raise,
    they are in ``result.report``.
    """
    member_ids, segments = _split_members(members)
    return stratify_columns(
        member_ids,
        segments,
        arms,
        experiment_id=experiment_id,
        seed=seed,
        tolerance=tolerance,
        min_per_cell=min_per_cell,
        assigned_at=assigned_at,
    )


def stratify_columns(
    member_ids: Sequence[str],
    segments: Sequence[str],
    arms: Sequence[Arm | str],
    *,
    experiment_id: str,
    seed: str | int = DEFAULT_SEED,
    tolerance: float = DEFAULT_TOLERANCE,
    min_per_cell: int = DEFAULT_MIN_PER_CELL,
    assigned_at: datetime | None = None,
) -> CohortAssignment:
    """:func:`stratify` for members given as two parallel columns (the fast path for files)."""
    arm_list = [_as_arm(arm) for arm in arms]
    problems = _settings_problems(experiment_id, seed, tolerance, min_per_cell)
    problems += _arm_problems(arm_list)
    if len(member_ids) != len(segments):
        problems.append(f"{len(member_ids)} member ids but {len(segments)} segments")
    else:
        problems += _member_problems(member_ids, segments)
    moment = _timestamp(assigned_at, problems)
    if problems:
        raise CohortInputError(problems)
    return _assign(
        member_ids,
        segments,
        arm_list,
        experiment_id=experiment_id,
        seed=str(seed),
        tolerance=tolerance,
        min_per_cell=min_per_cell,
        assigned_at=moment,
    )


def _assign(
    member_ids: Sequence[str],
    segments: Sequence[str],
    arms: Sequence[Arm],
    *,
    experiment_id: str,
    seed: str,
    tolerance: float,
    min_per_cell: int,
    assigned_at: datetime,
) -> CohortAssignment:
    names = sorted(set(segments))
    code_of = {name: code for code, name in enumerate(names)}
    codes = np.fromiter(map(code_of.__getitem__, segments), dtype=np.int64, count=len(segments))
    order = hash_order(member_ids, codes, seed, experiment_id)
    sizes_by_segment = np.bincount(codes, minlength=len(names)).tolist()
    weights = _weights(arms)
    cut = {name: apportion(size, weights) for name, size in zip(names, sizes_by_segment, strict=True)}

    def column(value: Callable[[str, Arm], str]) -> Iterable[str]:
        return chain.from_iterable(
            repeat(value(name, arm), size) for name in names for arm, size in zip(arms, cut[name], strict=True)
        )

    records = CohortRecords(
        list(map(member_ids.__getitem__, order)),
        list(column(lambda name, _arm: name)),
        list(column(lambda _name, arm: arm.id)),
        list(column(lambda name, arm: arm.variant_for(name))),
        assigned_at=assigned_at,
        seed=seed,
        experiment_id=experiment_id,
    )
    arm_ids = [arm.id for arm in arms]
    counts = {name: dict(zip(arm_ids, cut[name], strict=True)) for name in names}
    table = BalanceTable.from_counts(arm_ids, counts)
    report = check_balance(table, target_shares(arms), tolerance=tolerance, min_per_cell=min_per_cell)
    return CohortAssignment(experiment_id, seed, assigned_at, tuple(arms), records, report)
