"""A plain restatement of the seed document's reference implementation.

Deliberately naive (hexdigest, int parsing, a float loop over the thresholds, a fresh dict per
call), written straight from ``docs/seeds/ab_assignment_agent.md``. It generates the conformance file's
expected values and is the baseline the speed benchmark compares against. Never optimise it.
"""

from __future__ import annotations

import hashlib
from typing import Any


class ReferenceAgent:
    """The seed's ``ABAssignmentAgent``, restated without any optimisation."""

    def __init__(self, split_ratio: dict[str, float] | None = None, seed: str = "echovoice") -> None:
        self.split_ratio = split_ratio or {"A": 0.5, "B": 0.5}
        self.seed = seed
        self.variant_ids = sorted(self.split_ratio.keys())
        self.thresholds: dict[str, tuple[float, float]] = {}
        cumulative = 0.0
        for variant_id in self.variant_ids:
            lower = cumulative
            cumulative += self.split_ratio[variant_id]
            self.thresholds[variant_id] = (lower, cumulative)

    def _hash(self, user_id: str, experiment_id: str) -> float:
        hash_input = f"{self.seed}:{experiment_id}:{user_id}"
        hash_hex = hashlib.md5(hash_input.encode("utf-8"), usedforsecurity=False).hexdigest()
        hash_int = int(hash_hex[:8], 16)
        return (hash_int % 1000000) / 1000000

    def assign_user(self, user_id: str, experiment_id: str, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Assign one user, returning the documented dict."""
        hash_value = self._hash(user_id, experiment_id)
        assigned = self.variant_ids[-1]
        for variant_id in self.variant_ids:
            lower, upper = self.thresholds[variant_id]
            if lower <= hash_value < upper:
                assigned = variant_id
                break
        return {
            "variant_id": assigned,
            "hash_value": round(hash_value, 6),
            "threshold": self.thresholds[assigned],
            "experiment_id": experiment_id,
            "user_id": user_id,
            "strategy": "md5_hash",
            "deterministic": True,
            "split_ratio": self.split_ratio.copy(),
            "context": context or {},
        }
