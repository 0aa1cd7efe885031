"""Regenerate the cohort conformance file ``schemas/cohort-cases.json``: ``python -m tests.cohort_cases``.

Expected values come from :mod:`tests.cohort_reference` (the plain restatement), never from
``worker.domain.cohort``; the tests then hold the worker to this file.
"""

from __future__ import annotations

import csv
import json
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from tests.cohort_reference import assign

ROOT = Path(__file__).resolve().parent.parent
CASES_PATH = ROOT / "schemas" / "cohort-cases.json"
COHORT_250 = ROOT / "tests" / "data" / "cohort_250.csv"
DOCUMENT_ARMS = ["control", "treatment_1", "treatment_2", "treatment_3"]


def _cohort_250() -> list[tuple[str, str]]:
    with COHORT_250.open(encoding="utf-8", newline="") as stream:
        return [(row["customer_id"], row["segment"]) for row in csv.DictReader(stream)]


def _case(
    name: str,
    members: list[tuple[str, str]],
    arms: list[str] | list[tuple[str, str]],
    *,
    seed: str = "42",
    experiment_id: str = "email-tone-2025",
) -> dict[str, Any]:
    """One case; ``arms`` are ids (equal weights) or (id, weight as an exact fraction string)."""
    weighted = [(arm, "1") if isinstance(arm, str) else arm for arm in arms]
    assignments = assign(members, [(arm, Fraction(weight)) for arm, weight in weighted], seed, experiment_id)
    counts: dict[str, dict[str, int]] = {}
    for _, segment, arm in assignments:
        row = counts.setdefault(segment, {arm_id: 0 for arm_id, _ in weighted})
        row[arm] += 1
    return {
        "name": name,
        "experiment_id": experiment_id,
        "seed": seed,
        "arms": [
            {"id": arm, "weight": None} if isinstance(arm, str) else {"id": arm[0], "weight": arm[1]} for arm in arms
        ],
        "members": [list(member) for member in members],
        "assignments": [[member_id, arm] for member_id, _, arm in assignments],
        "counts": counts,
    }


def _random_cohort(rng: random.Random, size: int, segments: list[str]) -> list[tuple[str, str]]:
    ids = {f"m{rng.randrange(10**6)}" for _ in range(size)}
    return [(member_id, rng.choice(segments)) for member_id in sorted(ids)]


def build_cases() -> list[dict[str, Any]]:
    """Every case, in a stable order."""
    cohort = _cohort_250()
    rng = random.Random(20261129)
    cases = [
        _case("document scenario: 250 customers, four equal arms, seed 42", cohort, DOCUMENT_ARMS),
        _case("document scenario, seed 43", cohort, DOCUMENT_ARMS, seed="43"),
        _case(
            "document scenario, weights 1/2, 1/4, 1/4",
            cohort,
            [("control", "1/2"), ("treatment_1", "1/4"), ("treatment_2", "1/4")],
        ),
        _case(
            "remainder ties go to the earlier arm (1:1:2 over 6)",
            [(f"t{i}", "s") for i in range(6)],
            [("a", "1"), ("b", "1"), ("c", "2")],
        ),
        _case("thirds over 4", [(f"m{i}", "s") for i in range(4)], [("a", "1/3"), ("b", "1/3"), ("c", "1/3")]),
        _case("remainders .3/.6/.1", [(f"r{i}", "s") for i in range(3)], [("a", "1/10"), ("b", "2/10"), ("c", "7/10")]),
        _case("more arms than members", [("only", "s"), ("two", "s")], ["a", "b", "c", "d", "e"]),
        _case("one arm", cohort[:40], ["everyone"]),
        _case(
            "unicode ids and segments",
            [("用户-42", "Ü"), ("🙂", "Ü"), ("e\u0301tienne", "é"), ("ユーザー", "é"), ("مستخدم", "Ü"), ("a b", "é")],
            ["x", "y"],
            seed="s33d-ü",
            experiment_id="exp_ünïcode",
        ),
        _case("segment names sort by code point", [("1", "b"), ("2", "B"), ("3", "a10"), ("4", "a2")], ["p", "q"]),
    ]
    for index in range(6):
        members = _random_cohort(rng, rng.randrange(20, 120), ["north", "south", "east", "west"][: 1 + index % 4])
        arm_count = 2 + index % 4
        arms = [(f"arm{i}", str(Fraction(rng.randrange(1, 9), 8))) for i in range(arm_count)]
        cases.append(
            _case(f"random cohort {index}", members, arms, seed=str(rng.randrange(1000)), experiment_id="exp_r")
        )
    return cases


def main() -> int:
    """Write the file."""
    cases = build_cases()
    document = {
        "description": (
            "Known answers for ab-assignment-worker's stratified cohort assignment. Any implementation, in any "
            "language, must reproduce assignments (in order) and counts for every case."
        ),
        "version": 1,
        "algorithm": [
            "group members by segment; segments in plain code-point order of their names",
            'within a segment order members by md5(f"{seed}:{experiment_id}:{member_id}" as UTF-8).digest() '
            "(16 bytes, unsigned), ties by member id",
            "cut each segment into the arms in the listed order; sizes by largest remainder over exact weights "
            "(weight null = equal weights): floor(n * w / sum w) each, then one more to the largest remainders, "
            "ties to the earlier arm",
            "assignments lists [member_id, arm] in that output order",
        ],
        "cases": cases,
    }
    text = json.dumps(document, indent=1, ensure_ascii=False)
    # One [member, segment-or-arm] pair per line keeps the file short and its diffs readable.
    text = re.sub(r"\[\n\s*(\"[^\n]*\"),\n\s*(\"[^\n]*\")\n\s*\]", r"[\1, \2]", text)
    CASES_PATH.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {CASES_PATH} with {len(cases)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
