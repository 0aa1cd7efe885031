"""The demo a newcomer sees from ``make run``: realistic requests, and a summary of what happened."""

from __future__ import annotations

import json
import random
from collections import Counter

from worker.domain.registry import ExperimentRegistry

CAMPAIGNS = ("winter_2026", "spring_launch", "retention_q1")


def demo_requests(registry: ExperimentRegistry, count: int = 500, seed: int = 2026) -> list[bytes]:
    """``count`` realistic requests over the registry's experiments, plus a few poisoned ones.

    Contexts carry an e-mail address on purpose: the demo shows it never leaves the worker.
    """
    rng = random.Random(seed)
    experiments = list(registry)
    bodies: list[bytes] = []
    for index in range(count):
        experiment = rng.choice(experiments)
        body: dict[str, object] = {
            "user_id": f"U{100000 + rng.randrange(50000)}",
            "experiment_id": experiment.id,
            "request_id": f"demo-{index:05d}",
            "context": {"campaign": rng.choice(CAMPAIGNS), "email": f"person{index}@example.com"},
        }
        if experiment.config.segments:
            body["segment"] = rng.choice([*experiment.config.segments, "standard"])
        bodies.append(json.dumps(body).encode())
    bodies += [
        b"{this is not json",
        json.dumps({"user_id": "U1", "experiment_id": "exp_not_configured_yet"}).encode(),
        json.dumps({"experiment_id": "exp_001"}).encode(),
        json.dumps({"user_id": 42, "experiment_id": "exp_001"}).encode(),
    ]
    return bodies


def summary_table(assignments: Counter[tuple[str, str]], dead_letters: Counter[str]) -> str:
    """Per-experiment, per-variant counts and shares, then dead letters by reason."""
    lines = [f"{'experiment':<28}{'variant':<16}{'count':>7}{'share':>8}"]
    totals: Counter[str] = Counter()
    for (experiment, _), n in assignments.items():
        totals[experiment] += n
    for (experiment, variant), n in sorted(assignments.items()):
        lines.append(f"{experiment:<28}{variant:<16}{n:>7}{n / totals[experiment]:>8.1%}")
    if dead_letters:
        lines.append("")
        lines.append("dead-lettered:")
        lines.extend(f"  {reason:<26}{n:>7}" for reason, n in sorted(dead_letters.items()))
    return "\n".join(lines)
