"""One record per assigned member, stored as columns: what ``stratify`` writes and audits read back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from typing import overload

from worker.domain.moments import utc_iso

ASSIGNMENT_METHOD = "stratified_random"


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
