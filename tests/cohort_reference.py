"""A plain restatement of stratified cohort assignment, written from docs/cli.md's rule, not the code.

Deliberately naive (a hexdigest-free ``digest()`` sort key per member, a dict of lists per segment,
an explicit remainder loop). It generates ``schemas/cohort-cases.json`` and is what the tests hold
``worker.domain.cohort.stratify`` to. Never import the worker here.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction


def apportion(total: int, weights: list[Fraction]) -> list[int]:
    """Largest remainder: floor of each exact quota, then one more to the largest remainders (ties: earlier arm)."""
    weight_sum = sum(weights, Fraction(0))
    quotas = [Fraction(total) * weight / weight_sum for weight in weights]
    sizes = [math.floor(quota) for quota in quotas]
    remainders = [quota - size for quota, size in zip(quotas, sizes, strict=True)]
    left = total - sum(sizes)
    while left > 0:
        best = 0
        for index in range(1, len(weights)):
            if remainders[index] > remainders[best]:
                best = index
        sizes[best] += 1
        remainders[best] = Fraction(-1)
        left -= 1
    return sizes


def assign(
    members: list[tuple[str, str]], arms: list[tuple[str, Fraction]], seed: str, experiment_id: str
) -> list[tuple[str, str, str]]:
    """(member id, segment, arm id) in output order: segments by name, then arms in the listed order."""
    by_segment: dict[str, list[str]] = {}
    for member_id, segment in members:
        by_segment.setdefault(segment, []).append(member_id)

    def key(member_id: str) -> tuple[bytes, str]:
        text = f"{seed}:{experiment_id}:{member_id}"
        return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest(), member_id

    out: list[tuple[str, str, str]] = []
    for segment in sorted(by_segment):
        ordered = sorted(by_segment[segment], key=key)
        sizes = apportion(len(ordered), [weight for _, weight in arms])
        start = 0
        for (arm_id, _), size in zip(arms, sizes, strict=True):
            out += [(member_id, segment, arm_id) for member_id in ordered[start : start + size]]
            start += size
    return out
