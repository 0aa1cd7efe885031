"""Experiment arms: ids, weights, variants per segment, and the exact shares they are cut into."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from worker.domain.cohort.members import value_problem

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


def target_shares(arms: Sequence[Arm]) -> dict[str, Fraction]:
    """Each arm's exact target share: ``1/k`` unweighted, else its weight over the weight sum."""
    weights = arm_weights(arms)
    weight_sum = sum(weights, Fraction(0))
    return {arm.id: weight / weight_sum for arm, weight in zip(arms, weights, strict=True)}


def arm_weights(arms: Sequence[Arm]) -> list[Fraction]:
    """Each arm's exact weight: all 1 when none is weighted (a weight that is not one counts 0)."""
    if all(arm.weight is None for arm in arms):
        return [Fraction(1)] * len(arms)
    return [_as_fraction(arm.weight) or Fraction(0) for arm in arms]


def arm_problems(arms: Sequence[Arm]) -> list[str]:
    """Every problem with the arms: none, ids empty, refused or repeated, weights bad or partial, variants."""
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
