"""The MD5 rule and the documented ABAssignmentAgent API."""

from __future__ import annotations

import bisect
import json
import math
import tracemalloc
import unicodedata
from pathlib import Path

import pytest

from tests.reference import ReferenceAgent
from worker import ABAssignmentAgent, AssignmentStrategy
from worker.domain.assignment import VariantTable, assign_variants, bucket, compute_thresholds

CASES = json.loads((Path(__file__).parents[2] / "schemas" / "assignment-cases.json").read_text(encoding="utf-8"))[
    "cases"
]


@pytest.mark.parametrize(
    ("seed", "experiment", "user", "split", "expected_bucket", "expected_variant"),
    [
        ("echovoice", "exp_001", "U123", {"A": 0.5, "B": 0.5}, 0.002099, "A"),
        ("echovoice", "exp_personalization_001", "U123", {"A": 0.5, "B": 0.5}, 0.806547, "B"),
        ("echovoice", "exp_001", "U456", {"A": 0.7, "B": 0.3}, 0.421127, "A"),
        ("custom_seed_v2", "exp_001", "U123", {"A": 0.5, "B": 0.5}, 0.800272, "B"),
        ("echovoice", "exp_public", "u2226676", {"A": 0.5, "B": 0.5}, 0.5, "B"),
    ],
)
def test_known_answers(seed, experiment, user, split, expected_bucket, expected_variant):
    """The issue's known answers hold bit for bit."""
    result = ABAssignmentAgent(split, seed=seed).assign_user(user, experiment)
    assert result["hash_value"] == expected_bucket
    assert result["variant_id"] == expected_variant


def test_conformance_file_is_large_and_varied():
    """The conformance file has 300+ cases covering 2–6 variants, several seeds and boundaries."""
    assert len(CASES) >= 300
    assert {len(c["split_ratio"]) for c in CASES} >= {2, 3, 4, 5, 6}
    assert len({c["seed"] for c in CASES}) >= 3
    assert any(c["bucket"] == 0.3 and c["variant_id"] == "B" and len(c["split_ratio"]) == 3 for c in CASES)
    assert any(len(c["user_id"]) >= 1000 for c in CASES)
    assert any(not c["user_id"].isascii() for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['name']}:{c['user_id'][:20]}")
def test_conformance_case(case):
    """assign_user, the batch path and the plain reference all agree with the file."""
    agent = ABAssignmentAgent(case["split_ratio"], seed=case["seed"])
    result = agent.assign_user(case["user_id"], case["experiment_id"])
    assert result["hash_value"] == case["bucket"]
    assert result["variant_id"] == case["variant_id"]
    assert list(result["threshold"]) == case["threshold"]
    assert agent.assign_many([case["user_id"]], case["experiment_id"]) == [case["variant_id"]]
    assert (
        ReferenceAgent(case["split_ratio"], seed=case["seed"]).assign_user(case["user_id"], case["experiment_id"])[
            "variant_id"
        ]
        == case["variant_id"]
    )


def test_batch_path_matches_assign_user_on_many_users():
    """The batch path gives exactly assign_user's variants and buckets for 20,000 users."""
    agent = ABAssignmentAgent({"a": 0.1, "b": 0.2, "c": 0.7}, seed="s")
    users = [f"user-{i}" for i in range(20_000)]
    buckets, variants = assign_variants(users, "exp_x", agent.table, "s")
    expected = [agent.assign_user(u, "exp_x") for u in users]
    assert variants == [e["variant_id"] for e in expected]
    assert [b / 1e6 for b in buckets.tolist()] == [e["hash_value"] for e in expected]


def test_thresholds_are_float_sums_in_sorted_order():
    """B's upper bound is 0.1 + 0.2 as floats, not 0.3."""
    assert compute_thresholds({"C": 0.7, "A": 0.1, "B": 0.2}) == {
        "A": (0.0, 0.1),
        "B": (0.1, 0.30000000000000004),
        "C": (0.30000000000000004, 1.0),
    }


def test_bucket_exactly_on_float_boundary_uses_float_comparison():
    """An integer bucket of 300000 (0.3) is below 0.30000000000000004, so it is B."""
    table = VariantTable({"A": 0.1, "B": 0.2, "C": 0.7})
    assert table.variant_for(299_999) == "B"
    assert table.variant_for(300_000) == "B"
    assert table.variant_for(300_001) == "C"
    assert table.variant_for(100_000) == "B"
    assert table.variant_for(99_999) == "A"


def test_ratios_summing_under_one_fall_back_to_last_variant():
    """Buckets past the sum of ratios go to the last variant."""
    table = VariantTable({"A": 0.33, "B": 0.33, "C": 0.335})
    assert table.variant_for(999_999) == "C"
    assert table.lookup()[999_999] == 2


def test_zero_share_variant_is_never_assigned():
    """A variant with share 0 has an empty range."""
    table = VariantTable({"A": 0.5, "B": 0.0, "C": 0.5})
    assert {table.variant_for(b) for b in range(0, 1_000_000, 997)} == {"A", "C"}


def test_default_agent_matches_document():
    """Default split 50/50, seed echovoice, sorted variant ids, thresholds attribute."""
    agent = ABAssignmentAgent()
    assert agent.split_ratio == {"A": 0.5, "B": 0.5}
    assert agent.variant_ids == ["A", "B"]
    assert agent.thresholds == {"A": (0.0, 0.5), "B": (0.5, 1.0)}
    assert agent.seed == "echovoice"
    assert agent.strategy is AssignmentStrategy.MD5_HASH


def test_assign_user_returns_documented_dict():
    """Every documented key, with the documented types and values."""
    context = {"email": "user@example.com", "segment": "high_intent"}
    result = ABAssignmentAgent().assign_user("U123", "exp_001", context=context)
    assert result == {
        "variant_id": "A",
        "hash_value": 0.002099,
        "threshold": (0.0, 0.5),
        "experiment_id": "exp_001",
        "user_id": "U123",
        "strategy": "md5_hash",
        "deterministic": True,
        "split_ratio": {"A": 0.5, "B": 0.5},
        "context": context,
    }
    result["split_ratio"]["A"] = 0.9
    assert ABAssignmentAgent().split_ratio["A"] == 0.5


def test_same_inputs_same_assignment_across_agents():
    """Two agents with the same seed agree; a different seed reshuffles."""
    users = [f"U{i}" for i in range(500)]
    a1, a2 = ABAssignmentAgent(seed="echovoice"), ABAssignmentAgent(seed="echovoice")
    assert [a1.assign_user(u, "e")["variant_id"] for u in users] == [
        a2.assign_user(u, "e")["variant_id"] for u in users
    ]
    other = ABAssignmentAgent(seed="other")
    assert [a1.assign_user(u, "e")["variant_id"] for u in users] != [
        other.assign_user(u, "e")["variant_id"] for u in users
    ]


def test_distribution_follows_split():
    """70/30 over 100,000 users lands within half a point of 70%."""
    agent = ABAssignmentAgent({"A": 0.7, "B": 0.3})
    variants = agent.assign_many([f"user{i}" for i in range(100_000)], "exp_dist")
    assert abs(variants.count("A") / 100_000 - 0.7) < 0.005


def test_bucket_function_matches_reference():
    """The module-level bucket() is the seed's float."""
    assert bucket("echovoice", "exp_001", "U123") == 0.002099


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"A": 0.6, "B": 0.3}, "must sum to 1.0"),
        ({"A": 0.6, "B": 0.5}, "must sum to 1.0"),
        ({"A": -0.5, "B": 1.5}, ">= 0"),
        ({"A": math.nan, "B": 0.5}, "finite"),
        ({"A": "0.5", "B": 0.5}, "must be a number"),
        ({"A": True, "B": 0.0}, "must be a number"),
        ({"": 1.0}, "non-empty strings"),
        ({}, "non-empty mapping"),
    ],
)
def test_invalid_split_raises_value_error(split, message):
    """Bad splits raise ValueError with a message that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        ABAssignmentAgent(split)


def test_sum_error_names_the_ratios():
    """The sum error shows the ratios so the caller can see the typo."""
    with pytest.raises(ValueError, match=r"must sum to 1\.0") as info:
        ABAssignmentAgent({"A": 0.6, "B": 0.3})
    assert "'A': 0.6" in str(info.value)
    assert "0.9" in str(info.value)


def test_sum_within_tolerance_is_accepted():
    """0.99–1.01 is accepted, as the document's tolerance says."""
    assert ABAssignmentAgent({"A": 0.5, "B": 0.495}).variant_ids == ["A", "B"]
    assert ABAssignmentAgent({"A": 0.5, "B": 0.51}).variant_ids == ["A", "B"]


@pytest.mark.parametrize("strategy", [AssignmentStrategy.ROUND_ROBIN, AssignmentStrategy.RANDOM, "random"])
def test_stateful_strategies_are_refused(strategy):
    """ROUND_ROBIN and RANDOM raise, explaining why a stateless worker cannot honour them."""
    with pytest.raises(ValueError, match="stateless, deterministic"):
        ABAssignmentAgent(strategy=strategy)


def test_unknown_strategy_is_refused():
    """A strategy name that does not exist lists the valid ones."""
    with pytest.raises(ValueError, match="md5_hash"):
        ABAssignmentAgent(strategy="bandit")


def test_validate_assignment_accepts_own_output():
    """A fresh assignment validates."""
    agent = ABAssignmentAgent()
    assert agent.validate_assignment(agent.assign_user("U1", "e")) == (True, None)


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        ({"variant_id": None}, "Missing required field: variant_id"),
        ({"hash_value": None}, "Missing required field: hash_value"),
        ({"user_id": None}, "Missing required field: user_id"),
        ({"experiment_id": None}, "Missing required field: experiment_id"),
    ],
)
def test_validate_assignment_missing_fields(mutation, message):
    """Each missing field is named."""
    agent = ABAssignmentAgent()
    assignment = agent.assign_user("U1", "e")
    for key in mutation:
        del assignment[key]
    assert agent.validate_assignment(assignment) == (False, message)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("variant_id", "Z", "Invalid variant_id: Z"),
        ("hash_value", 1.5, "Hash value out of range: 1.5"),
        ("hash_value", -0.1, "Hash value out of range: -0.1"),
        ("hash_value", "0.5", "Hash value out of range: 0.5"),
    ],
)
def test_validate_assignment_bad_values(field, value, message):
    """Unknown variants and out-of-range hashes are reported with the documented messages."""
    agent = ABAssignmentAgent()
    assignment = agent.assign_user("U1", "e") | {field: value}
    assert agent.validate_assignment(assignment) == (False, message)


def test_batch_path_with_separator_characters_in_ids():
    """User ids containing newlines take the safe key-building path and still match the plain rule."""
    agent = ABAssignmentAgent({"A": 0.5, "B": 0.5})
    reference = ReferenceAgent({"A": 0.5, "B": 0.5})
    users = ["a\nb", "plain", "\n", "x\n\ny", *[f"u{i}" for i in range(50)]]
    buckets, variants = assign_variants(users, "e", agent.table, agent.seed)
    assert variants == [reference.assign_user(u, "e")["variant_id"] for u in users]
    assert [b / 1e6 for b in buckets.tolist()] == [bucket(agent.seed, "e", u) for u in users]


def test_batch_path_empty_input():
    """No users, no buckets."""
    buckets, variants = assign_variants([], "e", ABAssignmentAgent().table)
    assert len(buckets) == 0
    assert variants == []


@pytest.mark.parametrize(
    "bad",
    [
        *("", None, 123, 0, 1.5, b"U1", bytearray(b"U1"), ["U1"], "x" * 1025),
        *("a\x00b", "esc\x1b[31m", "nel\x85", "rlo\u202e", "zw\u200b", "ls\u2028", "lone\ud800"),
    ],
)
@pytest.mark.parametrize("field", ["user_id", "experiment_id"])
def test_assign_user_refuses_ids_the_worker_dead_letters(field, bad):
    """Empty, non-string, over-long ids and ids with refused characters raise ValueError naming the field."""
    ids = {"user_id": "U1", "experiment_id": "exp_001"} | {field: bad}
    with pytest.raises(ValueError, match=f"^{field} "):
        ABAssignmentAgent().assign_user(ids["user_id"], ids["experiment_id"])


@pytest.mark.parametrize("good", ["José", "用户 42", "🙂" * 200, "x" * 1024, "tab-free\u00a0nbsp", "👍🏽"])
def test_assign_user_accepts_ids_the_worker_accepts(good):
    """Spaces, emoji, non-ASCII and 1,024-character ids are assigned exactly as the reference does."""
    assert ABAssignmentAgent().assign_user(good, "exp_001") == ReferenceAgent().assign_user(good, "exp_001")


def test_nfc_and_nfd_ids_are_different_ids():
    """The bytes are hashed as given: NFC and NFD "José" are two users (publishers normalise to NFC)."""
    nfc, nfd = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")
    assert nfc != nfd
    agent = ABAssignmentAgent()
    results = [agent.assign_user(user, exp) for user in (nfc, nfd) for exp in ("exp_001", "exp_002", "exp_003")]
    assert [r["hash_value"] for r in results[:3]] != [r["hash_value"] for r in results[3:]]
    assert all(r["hash_value"] == bucket("echovoice", r["experiment_id"], r["user_id"]) for r in results)
    assert [r["user_id"] for r in results] == [nfc] * 3 + [nfd] * 3


def test_agents_are_cheap_to_keep():
    """100 live agents, each with its own split, hold well under 5 MiB (no eager 1 MB table each)."""
    splits = [{"A": 0.25, "B": 0.75 - i / 2**40, "C": i / 2**40} for i in range(1, 101)]
    tracemalloc.start()
    try:
        agents = [ABAssignmentAgent(split) for split in splits]
        for agent in agents:
            agent.assign_user("U1", "e")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(agents) == 100
    assert held < 5 * 2**20


def test_agents_with_one_split_share_its_table_without_sharing_state():
    """Equal splits share one compiled table; what an agent hands out cannot change another agent."""
    first, second = ABAssignmentAgent({"A": 0.7, "B": 0.3}), ABAssignmentAgent({"A": 0.7, "B": 0.3})
    assert first.table is second.table
    first.split_ratio["A"] = 0.1
    first.variant_ids.append("Z")
    with pytest.raises(TypeError):
        first.thresholds["A"] = (0.0, 0.1)  # type: ignore[index]
    assert second.split_ratio == {"A": 0.7, "B": 0.3}
    assert second.variant_ids == ["A", "B"]
    assert second.assign_user("U456", "exp_001")["threshold"] == (0.0, 0.7)


def test_shared_split_cache_does_not_confuse_bool_with_int():
    """{A: 1, B: 0} is a valid split; {A: True, B: False} is still refused after it was seen."""
    assert ABAssignmentAgent({"A": 1, "B": 0}).variant_ids == ["A", "B"]
    with pytest.raises(ValueError, match="must be a number"):
        ABAssignmentAgent({"A": True, "B": False})


def test_assign_many_refuses_what_assign_user_refuses():
    """The batch method checks ids by the same rule: one bad id or a bad experiment raises ValueError."""
    agent = ABAssignmentAgent()
    assert agent.assign_many(["U1", "José", "🙂"], "e") == [
        agent.assign_user(u, "e")["variant_id"] for u in ["U1", "José", "🙂"]
    ]
    for users, experiment in ((["U1", ""], "e"), (["U1", "a\u202eb"], "e"), (["U1", 5], "e"), (["U1"], "")):
        with pytest.raises(ValueError, match=r"^(user_id|experiment_id) "):
            agent.assign_many(users, experiment)  # type: ignore[arg-type]  # a non-string id, on purpose


@pytest.mark.parametrize(
    "split",
    [{"A": 0.1, "B": 0.2, "C": 0.7}, {"A": 0.33, "B": 0.33, "C": 0.335}, {"A": 0.5, "B": 0.0, "C": 0.5}, {"x": 1.0}],
)
def test_single_and_batch_paths_agree_next_to_every_boundary(split):
    """Float bounds (one user) and integer cutoffs (batch) pick the reference's variant around each edge."""
    table = VariantTable(split)
    reference = ReferenceAgent(split)
    near = {b + d for b in table.cutoffs for d in range(-3, 4)} | {0, 999_999}
    for value in sorted(b for b in near if 0 <= b < 1_000_000):
        expected = next(
            (
                v
                for v in reference.variant_ids
                if reference.thresholds[v][0] <= value / 1e6 < reference.thresholds[v][1]
            ),
            reference.variant_ids[-1],
        )
        assert table.names[bisect.bisect_right(table.bounds, value / 1e6)] == expected
        assert table.variant_for(value) == expected
        assert table.names[table.lookup()[value]] == expected


def test_one_agent_across_experiments_and_a_new_seed_matches_the_reference():
    """Alternating experiments, a bad experiment in between, and a reassigned seed all hash correctly."""
    agent = ABAssignmentAgent()
    for experiment in ["exp_001", "exp_personalization_001", "exp_001", "exp_personalization_001"]:
        assert agent.assign_user("U123", experiment) == ReferenceAgent().assign_user("U123", experiment)
        with pytest.raises(ValueError, match=r"^experiment_id "):
            agent.assign_user("U123", "bad\x85")
    agent.seed = "custom_seed_v2"
    assert agent.assign_user("U123", "exp_001")["hash_value"] == 0.800272
    assert agent.seed == "custom_seed_v2"
