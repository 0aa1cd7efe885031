"""Regenerate the conformance file ``schemas/assignment-cases.json``: ``python -m tests.conformance_cases``.

Expected values come from :class:`tests.reference.ReferenceAgent` (the straightforward restatement),
never from the worker's optimised code; the tests then hold the worker to this file.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

from tests.reference import ReferenceAgent

CASES_PATH = Path(__file__).resolve().parent.parent / "schemas" / "assignment-cases.json"

SPLITS: list[dict[str, float]] = [
    {"A": 0.5, "B": 0.5},
    {"A": 0.7, "B": 0.3},
    {"A": 0.9, "B": 0.1},
    {"A": 0.1, "B": 0.2, "C": 0.7},
    {"control": 0.5, "test_1": 0.3, "test_2": 0.2},
    {"control": 0.25, "treatment_1": 0.25, "treatment_2": 0.25, "treatment_3": 0.25},
    {"v1": 0.1, "v2": 0.15, "v3": 0.2, "v4": 0.25, "v5": 0.3},
    {f"arm_{i}": 1 / 6 for i in range(6)},
    {"A": 0.33, "B": 0.33, "C": 0.335},
    {"b": 0.2, "B": 0.3, "a10": 0.25, "a2": 0.25},
]
SEEDS = ["echovoice", "custom_seed_v2", "s33d-ü", "42"]
UNICODE_USERS = ["用户-42", "Ü123", "🙂user", "e\u0301tienne", "ユーザー", "مستخدم", "user with spaces", "u:colon:id"]

#: (experiment, user, integer bucket) found by scanning user ids; used for exact-boundary cases.
BOUNDARY_EXPERIMENT = "exp_boundary"
BOUNDARY_TARGETS = {0, 100_000, 300_000, 500_000, 700_000, 995_000, 999_999}


def _case(name: str, seed: str, experiment_id: str, user_id: str, split: dict[str, float]) -> dict[str, Any]:
    result = ReferenceAgent(split, seed=seed).assign_user(user_id, experiment_id)
    return {
        "name": name,
        "seed": seed,
        "experiment_id": experiment_id,
        "user_id": user_id,
        "split_ratio": split,
        "bucket": result["hash_value"],
        "bucket_int": round(result["hash_value"] * 1_000_000),
        "variant_id": result["variant_id"],
        "threshold": list(result["threshold"]),
    }


def find_boundary_users(limit: int = 40_000_000) -> dict[int, str]:
    """Scan ``b0, b1, …`` for users whose bucket lands exactly on each target."""
    from worker.domain.assignment import bucket_ints

    found: dict[int, str] = {}
    chunk = 200_000
    for start in range(0, limit, chunk):
        users = [f"b{i}" for i in range(start, start + chunk)]
        for user, value in zip(users, bucket_ints("echovoice", BOUNDARY_EXPERIMENT, users).tolist(), strict=True):
            if value in BOUNDARY_TARGETS and value not in found:
                found[value] = user
        if len(found) == len(BOUNDARY_TARGETS):
            break
    return found


def build_cases() -> list[dict[str, Any]]:
    """Every case, in a stable order."""
    cases = [
        _case("seed doc: U123/exp_001 50/50", "echovoice", "exp_001", "U123", {"A": 0.5, "B": 0.5}),
        _case("seed doc: U123/exp_personalization_001", "echovoice", "exp_personalization_001", "U123", SPLITS[0]),
        _case("seed doc: U456/exp_001 70/30", "echovoice", "exp_001", "U456", {"A": 0.7, "B": 0.3}),
        _case("seed doc: custom seed", "custom_seed_v2", "exp_001", "U123", {"A": 0.5, "B": 0.5}),
        _case("bucket exactly 0.5 goes to B", "echovoice", "exp_public", "u2226676", {"A": 0.5, "B": 0.5}),
    ]
    for value, user in sorted(find_boundary_users().items()):
        for split in (SPLITS[0], SPLITS[1], SPLITS[3], SPLITS[8], SPLITS[7]):
            cases.append(_case(f"boundary bucket {value / 1e6}", "echovoice", BOUNDARY_EXPERIMENT, user, split))
    rng = random.Random(20261124)
    for index, user in enumerate(UNICODE_USERS):
        cases.append(_case("unicode user id", SEEDS[index % len(SEEDS)], "exp_ünïcode", user, SPLITS[index % 10]))
    for length in (256, 1000, 1024):
        user = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(length))
        cases.append(_case(f"very long user id ({length} chars)", "echovoice", "exp_long", user, SPLITS[5]))
    cases.append(_case("very long experiment id", "echovoice", "e" * 1024, "U123", SPLITS[4]))
    for index in range(280):
        seed = SEEDS[index % len(SEEDS)]
        split = SPLITS[index % len(SPLITS)]
        user = f"U{rng.randrange(10**9)}"
        cases.append(_case("random", seed, f"exp_{index % 7:03d}", user, split))
    return cases


def main() -> int:
    """Write the file."""
    cases = build_cases()
    document = {
        "description": (
            "Known answers for the ab-assignment-worker MD5 assignment rule. Any implementation, in any "
            "language, must reproduce bucket and variant_id for every case."
        ),
        "version": 1,
        "algorithm": [
            'key = f"{seed}:{experiment_id}:{user_id}" encoded as UTF-8',
            "bucket_int = int(md5(key).hexdigest()[:8], 16) % 1000000 ; bucket = bucket_int / 1000000",
            "variants sorted by id (plain code-point string sort); upper bounds are running float sums of the "
            "ratios in that order; lower = previous upper (first lower = 0.0)",
            "variant = first with lower <= bucket < upper (compared as IEEE-754 doubles); if none, the last variant",
        ],
        "cases": cases,
    }
    CASES_PATH.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {CASES_PATH} with {len(cases)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
