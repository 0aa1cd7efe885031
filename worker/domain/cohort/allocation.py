"""A cohort under its experiment's allocation: who is decided before stratification, and who is stratified.

When the cohort's experiment is in the registry, each member is first walked through the
experiment's allocation steps (``docs/allocation.md``) — overrides, lifecycle (status and
schedule), targeting, holdouts and the layer — exactly as live traffic is. A member one of those
steps decides keeps that decision (its variant, ``in_experiment`` false, its reason); the others
are stratified as any cohort is. So a cohort never holds, among its stratified members, a user
live traffic holds out, targets away, puts in another layer slice, overrides or serves outside a
running window.

**Coverage is left out.** Coverage is the share of live traffic a ramp exposes; a cohort is a
population chosen on purpose and assigned whole, so it is not ramped: applying coverage would drop
a random share of the members someone listed. The issue's words are "honours overrides, holdouts,
layers and lifecycle", and targeting is applied too, since the members' contexts are at hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from worker.domain.allocation import AllocatedExperiment, Decision, Reason

#: The steps a cohort does not take (see the module's docstring).
LEFT_OUT = frozenset({"coverage"})


@dataclass(frozen=True, slots=True)
class DecidedMembers:
    """The members an allocation step decided, in input order, with each one's decision."""

    member_ids: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.member_ids)

    def by_reason(self) -> dict[str, list[str]]:
        """Member ids per reason, reasons in the order of the walk's steps, ids in input order."""
        found: dict[str, list[str]] = {}
        for member_id, decision in zip(self.member_ids, self.decisions, strict=True):
            found.setdefault(decision.reason.value, []).append(member_id)
        return dict(sorted(found.items(), key=lambda item: _STEP_RANK[item[0]]))

    def counts(self) -> dict[str, int]:
        """How many members each reason decided."""
        return {reason: len(ids) for reason, ids in self.by_reason().items()}

    def counts_text(self) -> str:
        """:meth:`counts` for a sentence: ``override 2, holdout 1``."""
        return ", ".join(f"{reason} {count}" for reason, count in self.counts().items())


#: Reasons in the order their steps are tried (§2.3: :class:`Reason` lists them so), so every report lists them alike.
_STEP_RANK = {reason.value: rank for rank, reason in enumerate(Reason)}


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Partition:
    """A cohort split by its experiment's allocation: the positions to stratify, and the members decided."""

    stratified: list[int]
    decided: DecidedMembers

    def pick(self, column: Sequence[_T]) -> list[_T]:
        """``column``'s values at the stratified positions, in order."""
        return [column[position] for position in self.stratified]


def partition(
    experiment: AllocatedExperiment,
    member_ids: Sequence[str],
    segments: Sequence[str],
    contexts: Sequence[Mapping[str, object] | None] | None,
    at: datetime,
) -> Partition:
    """Walk every member through the experiment's steps but coverage and the bucket (the decision time ``at``).

    ``contexts`` is one context per member (targeting reads it) or ``None`` when there are none.
    The member's segment is its segment for the walk too, as a request's would be.
    """
    gate = experiment.eligibility(leave_out=LEFT_OUT)
    stratified: list[int] = []
    decided = DecidedMembers()
    for position, (member_id, segment) in enumerate(zip(member_ids, segments, strict=True)):
        decision = gate(member_id, segment, None if contexts is None else contexts[position], at)
        if decision is None:
            stratified.append(position)
        else:
            decided.member_ids.append(member_id)
            decided.segments.append(segment)
            decided.decisions.append(decision)
    return Partition(stratified, decided)
