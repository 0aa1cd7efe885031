"""Stratified cohort assignment: the document's scenario, reproducibility, apportionment, balance checks."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import cohort_cases, cohort_reference
from worker.domain.cohort.arms import Arm, apportion
from worker.domain.cohort.balance import BalanceTable, Cell
from worker.domain.cohort.errors import CohortInputError
from worker.domain.cohort.members import Member
from worker.domain.cohort.records import ASSIGNMENT_METHOD, CohortRecord
from worker.domain.cohort.stratify import CohortAssignment, order_by_digest, stratify

DATA = Path(__file__).resolve().parents[1] / "data" / "cohort_250.csv"
COHORT_CASES = json.loads(cohort_cases.CASES_PATH.read_text(encoding="utf-8"))["cases"]
ARMS = ["control", "treatment_1", "treatment_2", "treatment_3"]
EXPERIMENT = "email-tone-2025"
MOMENT = datetime(2025, 11, 23, 9, 0, tzinfo=UTC)
#: Any text without the characters the contract's rule refuses (controls, format characters such as
#: bidi and zero-width ones, line separators, lone surrogates; all are rejected as input).
IDS = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Cn", "Zl", "Zp")), min_size=1, max_size=6)


def load_cohort() -> list[tuple[str, str]]:
    with DATA.open(encoding="utf-8", newline="") as stream:
        return [(row["customer_id"], row["segment"]) for row in csv.DictReader(stream)]


def run(members: Sequence[object], arms: Sequence[Arm | str] | None = None, **options: object) -> CohortAssignment:
    settings_: dict[str, object] = {"experiment_id": EXPERIMENT, "assigned_at": MOMENT, **options}
    return stratify(members, arms if arms is not None else list(ARMS), **settings_)  # type: ignore[arg-type]


def reference(members: list[tuple[str, str]], arm_ids: list[str], seed: str, experiment: str) -> list[tuple[str, str]]:
    """The plain restatement (tests/cohort_reference.py): (member id, arm) in output order, equal weights."""
    arms = [(arm, Fraction(1)) for arm in arm_ids]
    return [(member_id, arm) for member_id, _, arm in cohort_reference.assign(members, arms, seed, experiment)]


# --- the document's scenario ----------------------------------------------------------------------


def test_fixture_has_the_documents_segment_sizes() -> None:
    """tests/data/cohort_250.csv holds 84 High-Value Recent, 145 Standard and 21 New Customer members."""
    members = load_cohort()
    sizes = {s: sum(1 for _, seg in members if seg == s) for s in {seg for _, seg in members}}
    assert sizes == {"High-Value Recent": 84, "Standard": 145, "New Customer": 21}
    assert len({member_id for member_id, _ in members}) == 250


def test_document_scenario_reproduces_the_codes_table() -> None:
    """Four equal arms give 21×4, 37/36/36/36 and 6/5/5/5: the extra members go to the FIRST arms."""
    report = run(load_cohort()).report
    table = report.table
    assert table.counts == {
        "High-Value Recent": dict.fromkeys(ARMS, 21),
        "New Customer": {"control": 6, "treatment_1": 5, "treatment_2": 5, "treatment_3": 5},
        "Standard": {"control": 37, "treatment_1": 36, "treatment_2": 36, "treatment_3": 36},
    }
    assert table.column_totals == {"control": 64, "treatment_1": 62, "treatment_2": 62, "treatment_3": 62}
    assert table.row_totals == {"High-Value Recent": 84, "New Customer": 21, "Standard": 145}
    assert table.total == 250


def test_document_scenario_passes_every_check() -> None:
    """All three of the document's checks pass for the 250-customer scenario."""
    report = run(load_cohort()).report
    assert report.passed
    assert [c.name for c in report.checks] == [
        "arm_share_within_tolerance",
        "segments_in_every_arm",
        "min_members_per_cell",
    ]
    assert all(c.passed and not c.offending_cells for c in report.checks)
    assert report.target_shares == dict.fromkeys(ARMS, Fraction(1, 4))


def test_records_carry_the_documented_metadata() -> None:
    """Records carry id, segment, arm, variant (the arm id here), one timestamp, method, seed and experiment."""
    result = run(load_cohort())
    records = list(result.records)
    assert len(records) == 250
    assert {r.customer_id for r in records} == {member_id for member_id, _ in load_cohort()}
    assert all(r.variant_id == r.experiment_arm for r in records)
    assert {(r.assigned_at, r.assignment_method, r.seed, r.experiment_id) for r in records} == {
        (MOMENT, ASSIGNMENT_METHOD, "42", EXPERIMENT)
    }
    assert records[0].to_dict()["assigned_at"] == "2025-11-23T09:00:00Z"


def test_table_recounted_from_records_matches_report() -> None:
    """Counting the records again gives the report's table."""
    result = run(load_cohort())
    assert BalanceTable.from_records(result.records, ARMS) == result.report.table


@pytest.mark.parametrize("case", COHORT_CASES, ids=[case["name"] for case in COHORT_CASES])
def test_cohort_conformance_case(case: dict) -> None:
    """schemas/cohort-cases.json (from the plain restatement): same assignments in the same order, same table."""
    arms: list[Arm | str] = [
        arm["id"] if arm["weight"] is None else Arm(arm["id"], Fraction(arm["weight"])) for arm in case["arms"]
    ]
    members = [(member_id, segment) for member_id, segment in case["members"]]
    result = stratify(members, arms, experiment_id=case["experiment_id"], seed=case["seed"], assigned_at=MOMENT)
    assert [[r.customer_id, r.experiment_arm] for r in result.records] == case["assignments"]
    assert result.report.table.counts == case["counts"]


def test_cohort_cases_file_is_fresh() -> None:
    """schemas/cohort-cases.json is what tests/cohort_cases.py generates (run python -m tests.cohort_cases)."""
    assert json.loads(json.dumps(cohort_cases.build_cases())) == COHORT_CASES


def test_records_follow_the_plain_reference_rule() -> None:
    """The fast path agrees with a plain sort-by-digest implementation of the rule."""
    members = load_cohort()
    got = [(r.customer_id, r.experiment_arm) for r in run(members).records]
    assert got == reference(members, ARMS, "42", EXPERIMENT)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(IDS.filter(str.strip), st.sampled_from("abc")), max_size=60),
    st.integers(min_value=1, max_value=5),
    IDS.filter(str.strip),
)
def test_fast_path_matches_reference_on_random_cohorts(members: list[tuple[str, str]], arms: int, seed: str) -> None:
    """For any cohort, arm count and seed the records match the reference implementation."""
    unique = list(dict(members).items())
    if not unique:
        return
    arm_ids = [f"arm{i}" for i in range(arms)]
    got = [(r.customer_id, r.experiment_arm) for r in run(unique, list(arm_ids), seed=seed).records]
    assert got == reference(unique, arm_ids, seed, EXPERIMENT)


# --- reproducibility -----------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle_seed", [1, 2, 3])
def test_shuffled_input_gives_identical_records(shuffle_seed: int) -> None:
    """The same set of members in any row order gives identical records."""
    members = load_cohort()
    shuffled = members[:]
    random.Random(shuffle_seed).shuffle(shuffled)
    assert list(run(shuffled).records) == list(run(members).records)


@settings(max_examples=25, deadline=None)
@given(st.permutations(load_cohort()))
def test_any_permutation_gives_identical_records(members: list[tuple[str, str]]) -> None:
    """Order independence holds for arbitrary permutations, not just a few shuffles."""
    assert run(members).records == run(load_cohort()).records


def test_repeated_runs_are_identical() -> None:
    """Two runs with the same inputs give the same records and report."""
    first, second = run(load_cohort()), run(load_cohort())
    assert first.records == second.records
    assert first.report == second.report


def test_a_different_seed_changes_the_order_but_not_the_counts() -> None:
    """Seed 43 assigns different members to each arm, with the same table."""
    default, other = run(load_cohort()), run(load_cohort(), seed=43)
    assert [r.customer_id for r in default.records] != [r.customer_id for r in other.records]
    assert default.report.table == other.report.table
    assert {r.seed for r in other.records} == {"43"}


def test_integer_and_string_seed_hash_alike() -> None:
    """The seed is formatted with str(): 42 and "42" give the same assignment."""
    assert run(load_cohort(), seed=42).records == run(load_cohort(), seed="42").records


def test_experiment_id_is_part_of_the_key() -> None:
    """Another experiment id reorders members."""
    other = stratify(load_cohort(), ARMS, experiment_id="another", assigned_at=MOMENT)
    assert [r.customer_id for r in other.records] != [r.customer_id for r in run(load_cohort()).records]


def test_members_may_be_dataclasses() -> None:
    """Member objects and (id, segment) pairs give the same result."""
    members = load_cohort()
    assert run([Member(i, s) for i, s in members]).records == run(members).records


def test_default_timestamp_is_now_in_utc() -> None:
    """Without assigned_at every record shares one current UTC timestamp."""
    before = datetime.now(UTC)
    result = stratify(load_cohort(), ARMS, experiment_id=EXPERIMENT)
    assert before <= result.assigned_at <= datetime.now(UTC)
    assert {r.assigned_at for r in result.records} == {result.assigned_at}


def test_aware_timestamps_are_converted_to_utc() -> None:
    """An assigned_at in another zone is stored in UTC."""
    local = datetime(2025, 11, 23, 10, 0, tzinfo=timezone(timedelta(hours=1)))
    assert run(load_cohort(), assigned_at=local).assigned_at == MOMENT


def test_order_by_digest_breaks_digest_ties_by_member_id() -> None:
    """Equal digests (an MD5 collision) within a segment are ordered by member id."""
    same = bytes(16)
    digests = b"".join([b"\xff" * 16, same, same, same, bytes(15) + b"\x01"])
    codes = np.array([0, 0, 0, 0, 0])
    ids = ["e", "c", "a", "b", "d"]
    assert [ids[i] for i in order_by_digest(digests, codes, ids)] == ["a", "b", "c", "d", "e"]


def test_order_by_digest_compares_digests_as_unsigned_bytes() -> None:
    """The second 8 bytes decide when the first 8 are equal, and high bytes sort last."""
    digests = b"".join([b"\x80" + bytes(15), bytes(8) + b"\x02" + bytes(7), bytes(8) + b"\x01" + bytes(7)])
    assert order_by_digest(digests, np.array([0, 0, 0]), ["x", "y", "z"]) == [2, 1, 0]


# --- apportionment -----------------------------------------------------------------------------


@pytest.mark.parametrize("total", range(30))
@pytest.mark.parametrize("arms", range(1, 7))
def test_equal_weights_follow_the_documents_code(total: int, arms: int) -> None:
    """Equal weights: n // k each and one more for the first n % k arms, as the document's code does."""
    expected = [total // arms + (1 if i < total % arms else 0) for i in range(arms)]
    assert apportion(total, [Fraction(1)] * arms) == expected


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (7, ["0.5", "0.25", "0.25"], [3, 2, 2]),  # remainders .5/.75/.75: both .75s win
        (5, ["0.5", "0.25", "0.25"], [3, 1, 1]),  # remainders .5/.25/.25: the .5 wins
        (6, ["1", "1", "2"], [2, 1, 3]),  # a .5/.5 tie goes to the earlier arm
        (3, ["0.1", "0.2", "0.7"], [0, 1, 2]),  # remainders .3/.6/.1
        (10, ["0.1", "0.2", "0.3", "0.4"], [1, 2, 3, 4]),  # exact quotas
        (4, ["1/3", "1/3", "1/3"], [2, 1, 1]),
    ],
)
def test_largest_remainder_apportionment(total: int, weights: list[str], expected: list[int]) -> None:
    """Hamilton apportionment with ties to the earlier arm."""
    assert apportion(total, [Fraction(w) for w in weights]) == expected


def test_float_weights_are_exact_decimals() -> None:
    """Float weights go through repr, so 1/3 written as floats still ties exactly (to the earlier arm)."""
    third = 1 / 3
    result = run(
        [(f"m{i}", "s") for i in range(4)], [Arm("a", third), Arm("b", third), Arm("c", third)], min_per_cell=0
    )
    assert result.report.table.counts["s"] == {"a": 2, "b": 1, "c": 1}


def test_unequal_weights_apportion_each_segment() -> None:
    """A 50/25/25 split is apportioned within each segment of the document's cohort."""
    arms = [Arm("control", 0.5), Arm("treatment_1", 0.25), Arm("treatment_2", Decimal("0.25"))]
    table = run(load_cohort(), arms).report.table
    assert table.counts["High-Value Recent"] == {"control": 42, "treatment_1": 21, "treatment_2": 21}
    assert table.counts["Standard"] == {"control": 73, "treatment_1": 36, "treatment_2": 36}  # 72.5/36.25/36.25
    assert table.counts["New Customer"] == {"control": 11, "treatment_1": 5, "treatment_2": 5}  # 10.5/5.25/5.25
    assert run(load_cohort(), arms).report.target_shares["control"] == Fraction(1, 2)


def test_weights_are_relative() -> None:
    """Weights 2:1:1 and 0.5/0.25/0.25 give the same assignment."""
    fractions = [Arm("a", 0.5), Arm("b", 0.25), Arm("c", 0.25)]
    integers = [Arm("a", 2), Arm("b", 1), Arm("c", 1)]
    assert run(load_cohort(), fractions).records == run(load_cohort(), integers).records


def test_variants_by_segment_name_the_variant() -> None:
    """An arm's variant per segment is used where named; other segments get the arm id."""
    tones = {"Standard": "urgent_v2", "New Customer": "urgent_welcome"}
    arms: list[Arm | str] = ["control", Arm("treatment_1", variants_by_segment=tones), "treatment_2", "treatment_3"]
    records = list(run(load_cohort(), arms).records)
    variants = {(r.segment, r.variant_id) for r in records if r.experiment_arm == "treatment_1"}
    assert variants == {
        ("Standard", "urgent_v2"),
        ("New Customer", "urgent_welcome"),
        ("High-Value Recent", "treatment_1"),
    }
    assert {r.variant_id for r in records if r.experiment_arm == "control"} == {"control"}


# --- balance checks -------------------------------------------------------------------------------


def check(result: CohortAssignment, name: str) -> tuple[bool, str, tuple[Cell, ...]]:
    found = next(c for c in result.report.checks if c.name == name)
    return found.passed, found.detail, found.offending_cells


def test_arm_share_check_names_the_arm_outside_tolerance() -> None:
    """Four segments of 5 give control 40%: it fails; the others at exactly 20% sit on the ±5 pp edge and pass."""
    members = [(f"{s}{i}", s) for s in "wxyz" for i in range(5)]
    result = run(members, min_per_cell=1)
    passed, detail, cells = check(result, "arm_share_within_tolerance")
    assert not passed
    assert cells == (Cell("control", None, 8),)
    assert "control 40.0% (target 25.0%)" in detail
    assert not result.report.passed


def test_segment_representation_check_names_empty_cells() -> None:
    """A two-member segment leaves two arms empty, and exactly those cells are named."""
    members = [*load_cohort(), ("T1", "Tiny"), ("T2", "Tiny")]
    passed, detail, cells = check(run(members), "segments_in_every_arm")
    assert not passed
    assert cells == (Cell("treatment_2", "Tiny", 0), Cell("treatment_3", "Tiny", 0))
    assert "Tiny × treatment_2, Tiny × treatment_3" in detail


def test_min_per_cell_check_names_small_cells() -> None:
    """A 12-member segment puts 3 in each arm, below the minimum of 5; all four cells are named."""
    members = [(m, s) for m, s in load_cohort() if s != "New Customer"] + [(f"N{i}", "New Customer") for i in range(12)]
    result = run(members)
    passed, detail, cells = check(result, "min_members_per_cell")
    assert not passed
    assert [c.label() for c in cells] == [f"New Customer × {arm}" for arm in ARMS]
    assert "below the minimum of 5" in detail
    assert "New Customer × control = 3" in detail
    assert check(result, "segments_in_every_arm")[0]


def test_a_failed_check_is_reported_not_fixed() -> None:
    """A zero tolerance fails the share check but leaves the assignment exactly as it was."""
    strict, default = run(load_cohort(), tolerance=0), run(load_cohort())
    assert not check(strict, "arm_share_within_tolerance")[0]
    assert strict.records == default.records


def test_report_serialises_to_json() -> None:
    """to_dict gives JSON with checks, offending cells, the table and (optionally) the records."""
    members = [*load_cohort(), ("T1", "Tiny")]
    document = json.loads(json.dumps(run(members).to_dict(include_records=True)))
    assert document["balance"]["passed"] is False
    failed = {c["name"]: c for c in document["balance"]["checks"] if not c["passed"]}
    assert {"segment": "Tiny", "arm": "treatment_1", "count": 0} in failed["segments_in_every_arm"]["offending_cells"]
    assert document["balance"]["table"]["column_totals"]["control"] == 65
    assert document["arms"][0] == {"id": "control", "weight": None, "target_share": 0.25, "variants_by_segment": None}
    assert len(document["records"]) == 251
    assert document["records"][0]["assigned_at"] == "2025-11-23T09:00:00Z"


def test_records_view_behaves_as_a_sequence() -> None:
    """Records index, slice, iterate and stream as CSV rows consistently."""
    records = run(load_cohort()).records
    assert isinstance(records[0], CohortRecord)
    assert records[-1] == list(records)[-1]
    assert records[1:3] == list(records)[1:3]
    row = next(records.rows())
    assert row == tuple(records[0].to_dict().values())


# --- input validation ----------------------------------------------------------------------------


def test_every_member_problem_is_listed() -> None:
    """Duplicate ids, empty ids and empty segments are all reported in one error."""
    members = [("a", "s"), ("b", "s"), ("a", "s"), ("", "s"), ("c", " "), ("b", "t")]
    with pytest.raises(CohortInputError) as caught:
        run(members)
    problems = caught.value.problems
    assert "members[2]: duplicate member id 'a' (first at members[0])" in problems
    assert "members[5]: duplicate member id 'b' (first at members[1])" in problems
    assert "members[3]: member id: empty" in problems
    assert "members[4]: segment: empty" in problems
    assert len(problems) == 4
    assert str(caught.value).startswith("4 problems")


@pytest.mark.parametrize(
    ("arms", "fragment"),
    [
        ([], "no arms"),
        (["a", "a"], "duplicate arm id 'a'"),
        ([""], "arm id: empty"),
        (["a\tb"], "arm id: control character"),
        ([Arm("a", -1.0), Arm("b", 1.0)], "weight must be a finite number > 0"),
        ([Arm("a", float("nan")), Arm("b", 1.0)], "weight must be a finite number > 0"),
        ([Arm("a", 0), Arm("b", 1.0)], "weight must be a finite number > 0"),
        ([Arm("a", True), Arm("b", 1.0)], "weight must be a finite number > 0"),
        ([Arm("a", 0.5), Arm("b")], "give every arm a weight or none"),
        ([Arm("a", variants_by_segment={"s": ""})], "variant for segment 's'"),
    ],
)
def test_bad_arms_are_rejected(arms: list[Arm | str], fragment: str) -> None:
    """No arms, duplicate or empty ids and bad or partial weights raise CohortInputError."""
    with pytest.raises(CohortInputError, match=fragment):
        run(load_cohort(), arms)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"experiment_id": ""}, "experiment id"),
        ({"seed": True}, "seed"),
        ({"tolerance": 1.5}, "tolerance"),
        ({"min_per_cell": -1}, "min_per_cell"),
        ({"assigned_at": datetime(2025, 11, 23, 9, 0)}, "timezone-aware"),
    ],
)
def test_bad_settings_are_rejected(options: dict[str, Any], fragment: str) -> None:
    """Empty experiment id, boolean seed, tolerance outside [0, 1], negative minimum and naive timestamps raise."""
    with pytest.raises(CohortInputError, match=fragment):
        run(load_cohort(), **options)


def test_control_characters_are_rejected() -> None:
    """Ids and segments may not hold control characters (they break CSV, KQL and log lines)."""
    with pytest.raises(CohortInputError) as caught:
        run([("a\x00", "s"), ("b", "s\n"), ("\ud800", "s")])
    assert caught.value.problems == (
        "members[0]: member id: control character U+0000 at index 1",
        "members[1]: segment: control character U+000A at index 1",
        "members[2]: member id: not encodable as UTF-8 (a lone surrogate, U+D800 at index 0)",
    )


def test_empty_cohort_is_rejected() -> None:
    """A cohort with no members is an input error, not an empty assignment."""
    with pytest.raises(CohortInputError, match="no members"):
        run([])


def test_problems_from_arms_and_members_are_reported_together() -> None:
    """One error lists arm and member problems alike, not only the first."""
    with pytest.raises(CohortInputError) as caught:
        run([("a", "s"), ("a", "s")], ["x", "x"])
    assert len(caught.value.problems) == 2
    assert isinstance(caught.value, ValueError)
