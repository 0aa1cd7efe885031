"""The allocation algebra (worker/domain/allocation): conditions, versions, times, digests, walks, edits."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.instants import INSTANT_PATTERN, format_instant, instant_of_datetime, parse_instant
from schemas.models import VERSION_PATTERN, ExperimentFile
from tests import allocation_cases as cases
from tests import allocation_claims as claims
from tests import allocation_reference as ref
from worker.domain.allocation import changes, compile_condition, compile_file, version_key
from worker.domain.allocation.canonical import canonical_json, es_number
from worker.domain.errors import ConfigurationError

AT = datetime(2026, 12, 7, 12, tzinfo=UTC)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _compile(document: dict[str, Any], source: str = "f.yaml") -> Any:
    return compile_file(ExperimentFile.model_validate(document), source)


def _condition(raw: Any) -> Any:
    compiled, problems = compile_condition(raw)
    assert problems == [], problems
    return compiled


# --- conditions over hostile input ------------------------------------------------------------------

#: Every kind of value a context can hold after JSON decoding, and some the Python API could pass.
HOSTILE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**4000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.text(alphabet="0123456789.-+abrc", max_size=300)
    | st.sampled_from(["5.2.0", "2026-06-01T00:00:00Z", "9" * 1024, "1." * 200, "US", ""])
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
COMPILED_TESTS = [_condition({"x": test}) for test in cases.OPERATOR_TESTS]
COMPILED_COMBINED = [_condition(condition) for condition, _, _ in cases.COMBINED]


@FAST
@given(value=HOSTILE, context_kind=st.sampled_from(["dict", "none", "list", "string"]))
def test_conditions_never_raise(value, context_kind):
    """Any value, in any context shape, gives match or no match: never an exception."""
    context = {"dict": {"x": value, "a": value, "segment": value}, "none": None, "list": [value], "string": "x"}
    for compiled in COMPILED_TESTS + COMPILED_COMBINED:
        assert compiled.matches(context[context_kind], None) in (True, False)


@FAST
@given(value=HOSTILE)
def test_compiled_conditions_agree_with_the_reference(value):
    """The closures decide exactly as the plain recursive interpreter, for any value."""
    context = {"x": value}
    for test, compiled in zip(cases.OPERATOR_TESTS, COMPILED_TESTS, strict=True):
        assert compiled.matches(context, None) is ref.condition_matches({"x": test}, context, None), test


def test_hostile_numbers_compare_as_doubles():
    """A 4,000-digit integer is +infinity to $gt; NaN matches nothing, not even $ne."""
    huge = 10**4000
    assert _condition({"x": {"$gt": 1.5}}).matches({"x": huge}, None)
    assert not _condition({"x": {"$lt": 1.5}}).matches({"x": huge}, None)
    assert _condition({"x": {"$lt": 1.5}}).matches({"x": -huge}, None)
    for test in ({"$eq": 1}, {"$ne": 1}, {"$gt": 1}, {"$nin": [1]}, {"$lte": 1}):
        assert not _condition({"x": test}).matches({"x": math.nan}, None)
    assert _condition({"x": {"$exists": True}}).matches({"x": math.nan}, None)
    assert _condition({"x": 9007199254740992}).matches({"x": 9007199254740993}, None)  # the same double


def test_kinds_never_mix():
    """Booleans are not numbers, bytes are not strings, strings are not numbers or versions."""
    assert not _condition({"x": True}).matches({"x": 1}, None)
    assert not _condition({"x": 1}).matches({"x": True}, None)
    assert not _condition({"x": {"$in": [1, "US"]}}).matches({"x": True}, None)
    assert not _condition({"x": "US"}).matches({"x": b"US"}, None)
    assert not _condition({"x": {"$gt": 5}}).matches({"x": "6"}, None)
    assert not _condition({"x": {"$vgt": "5.0.0"}}).matches({"x": 6}, None)
    assert not _condition({"x": {"$ne": "US"}}).matches({"x": ["FR"]}, None)


def test_missing_matches_only_exists_false():
    """Missing and null are the same; only $exists: false and $not match them."""
    for context in ({}, {"x": None}, None):
        for test in cases.OPERATOR_TESTS:
            expected = test == {"$exists": False}
            assert _condition({"x": test}).matches(context, None) is expected, (test, context)
        assert _condition({"$not": {"x": "US"}}).matches(context, None)


def test_segment_is_the_request_segment_and_names_are_not_paths():
    """`segment` reads the request's segment (shadowing context.segment); dotted names are plain keys."""
    assert _condition({"segment": "vip"}).matches({"segment": "other"}, "vip")
    assert not _condition({"segment": "vip"}).matches({"segment": "vip"}, None)
    assert not _condition({"a.b": 1}).matches({"a": {"b": 1}}, None)
    assert _condition({"a.b": 1}).matches({"a.b": 1}, None)


def test_long_version_strings_are_bounded():
    """A 1,024-character string is no version; the parse is bounded and cached strings stay small."""
    compiled = _condition({"v": {"$vgt": "1.0.0"}})
    assert not compiled.matches({"v": "1." * 511 + "0"}, None)
    assert not compiled.matches({"v": "9" * 1024}, None)
    assert compiled.matches({"v": "9" * 200}, None)


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        ({"a": {"$regex": "^x"}}, "targeting.a.$regex", "regular expressions"),
        ({True: 1}, "targeting.True", "quote the key"),
        ({"a": datetime(2026, 1, 1, tzinfo=UTC)}, "targeting.a", "quote the time"),
        ({"a": {"$lt": datetime(2026, 1, 1)}}, "targeting.a.$lt", "no time zone"),
        ({"a": {"$lt": date(2026, 1, 1)}}, "targeting.a.$lt", "date without a time"),
        ({"a": {"$gt": math.nan}}, "targeting.a.$gt", "finite number"),
        ({"a": {"$eq": math.inf}}, "targeting.a.$eq", "finite number"),
        ({"a": {"$gt": 10**400}}, "targeting.a.$gt", "finite number"),
        ({"a": {"$gt": "5.2.0"}}, "targeting.a.$gt", "$vgt"),
        ({"a": {"$in": {"x", "y"}}}, "targeting.a.$in", "non-empty list"),
        ({"a": b"bytes"}, "targeting.a", "string, a number or a boolean"),
        ({"\ud800": 1}, "targeting.\ud800", "lone surrogate"),
        ({"a": "\ud800"}, "targeting.a", "lone surrogate"),
        ({"$x": [1]}, "targeting.$x", "unknown combinator"),
        ({"a": {"$where": "1"}}, "targeting.a.$where", "unknown operator"),
    ],
)
def test_condition_errors_name_the_path_and_the_fix(raw, path, words):
    """Load errors say where and what to write instead."""
    compiled, problems = compile_condition(raw)
    assert compiled is None
    assert [problem.path for problem in problems] == [path]
    assert words in problems[0].message


def test_yaml_times_and_numbers_have_one_canonical_form():
    """An unquoted YAML time and the quoted string, 1 and 1.0, give one canonical condition (one digest)."""
    unquoted = yaml.safe_load("t: {$gte: 2026-12-01T01:00:00+01:00}\nn: {$gt: 1}")
    quoted = {"t": {"$gte": "2026-12-01T00:00:00Z"}, "n": {"$gt": 1.0}}
    assert _condition(unquoted).canonical == _condition(quoted).canonical
    assert _condition(unquoted).canonical["t"]["$gte"] == "2026-12-01T00:00:00.000000Z"


# --- versions and times -----------------------------------------------------------------------------

VERSIONS = st.builds(
    "{}{}{}{}".format,
    st.sampled_from(["0", "1", "2", "10", "1.0", "1.2", "0.0.0", "1.2.3", "1.10.0", "99999999999999999999.1.2"]),
    st.sampled_from(["", "-0", "-1", "-alpha", "-alpha.1", "-alpha.beta", "-rc.10", "-rc.9", "-0a", "-a-b"]),
    st.sampled_from(["", "+build", "+b.1"]),
    st.just(""),
)


@FAST
@given(left=VERSIONS, right=VERSIONS)
def test_versions_order_as_the_reference(left, right):
    """The (length, digits) comparator orders like the reference's int-based one."""
    expected = ref.compare_versions(left, right)
    left_key, right_key = version_key(left), version_key(right)
    assert left_key is not None
    assert right_key is not None
    assert ((left_key > right_key) - (left_key < right_key)) == expected


@FAST
@given(text=st.text(max_size=30) | st.text(alphabet="0123456789.-+ab", max_size=30))
def test_versions_agree_with_the_schema_pattern(text):
    """version_key accepts exactly what the published pattern accepts (and never raises)."""
    pattern = re.fullmatch(VERSION_PATTERN.strip("^$"), text, re.ASCII) is not None and "\n" not in text
    assert (version_key(text) is not None) == pattern
    assert (ref.parse_version(text) is not None) == pattern


@FAST
@given(text=st.text(max_size=40) | st.text(alphabet="0123456789-:T.Z+", min_size=19, max_size=36))
def test_times_never_raise_and_agree_with_the_reference(text):
    """parse_instant gives the reference's instant for any string; what it accepts fits the schema pattern."""
    assert parse_instant(text) == ref.time_micros(text)
    if parse_instant(text) is not None:
        assert re.fullmatch(INSTANT_PATTERN.strip("^$"), text, re.ASCII)


@FAST
@given(moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)))
def test_time_forms_round_trip(moment):
    """format_instant ↔ parse_instant ↔ an aware datetime, to the microsecond."""
    micros = instant_of_datetime(moment)
    assert micros is not None
    assert parse_instant(format_instant(micros)) == micros
    assert instant_of_datetime(moment.astimezone(timezone(timedelta(hours=-7)))) == micros


# --- JCS ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0.0, "0"), (-0.0, "0"), (1.0, "1"), (-1.5, "-1.5"), (1e21, "1e+21"), (1e20, "100000000000000000000"),
        (1e-7, "1e-7"), (1e-6, "0.000001"), (0.002, "0.002"), (333333333.3333333, "333333333.3333333"),
        (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
        (9007199254740992.0, "9007199254740992"),
        (295147905179352830000.0, "295147905179352830000"), (123456789012345680000.0, "123456789012345680000"),
        (4.5, "4.5"), (0.30000000000000004, "0.30000000000000004"), (1.5e-7, "1.5e-7"), (-1e-7, "-1e-7"),
    ],
)  # fmt: skip
def test_jcs_numbers(number, text):
    """ECMAScript's Number::toString (RFC 8785's number form), including its published examples."""
    assert es_number(number) == text


@FAST
@given(number=st.floats(allow_nan=False, allow_infinity=False))
def test_jcs_numbers_round_trip_and_agree_with_the_reference(number):
    """Two independent formatters agree, and the text reads back as the same double."""
    assert es_number(number) == ref.jcs_number(number)
    assert float(es_number(number)) == number


def test_jcs_sorts_keys_by_utf16_code_units():
    """U+FFFF sorts after an astral character in UTF-16 (0xD83D...), unlike code points."""
    assert canonical_json({"\uffff": 1, "😀": 2, "a": 3}) == '{"a":3,"😀":2,"\uffff":1}'
    assert canonical_json({"b": [1.0, True, None, "é\n"]}) == '{"b":[1,true,null,"é\\n"]}'


# --- the walk and its explanation ---------------------------------------------------------------------


def _edges() -> Any:
    return _compile(cases.EDGES)


def test_a_naive_decision_time_is_refused():
    """The decision time must be timezone-aware: a naive one is a programming error."""
    experiment = _edges().experiments["cov_one"]
    with pytest.raises(ValueError, match="timezone-aware"):
        experiment.decide("u1", None, None, datetime(2026, 12, 7))
    with pytest.raises(ValueError, match="timezone-aware"):
        experiment.explain("u1", None, None, datetime(2026, 12, 7))


def test_a_plain_experiment_is_the_bucket_step_alone():
    """Without the new fields the walk is the seed rule only; explain says why each other step is absent."""
    experiment = _compile(cases.PLAIN).experiments["exp_001"]
    assert [step.name for step in experiment.steps] == ["bucket"]
    explanation = experiment.explain("U123", None, None, AT)
    assert [(record.step, record.outcome) for record in explanation.steps] == [
        *[
            (name, "not configured")
            for name in ("override", "status", "schedule", "targeting", "holdout", "layer", "coverage")
        ],
        ("bucket", "decided"),
    ]
    assert explanation.decision.variant_id == "A"
    assert explanation.steps[-1].hash_input == "echovoice:exp_001:U123"
    assert explanation.steps[-1].hash_value == 0.002099


def test_explain_records_every_step_in_order_and_never_a_context_value():
    """A full experiment: each step once in order (a holdout each), hashes and thresholds, no values."""
    experiment = _edges().experiments["everything"]
    context = {**cases.FULL_CONTEXT, "plan": "secret-plan-value"}
    for user in ("u1", "u2", "u3", "u4", "qa-1"):
        explanation = experiment.explain(user, "vip", context, AT)
        assert explanation.decision == experiment.decide(user, "vip", context, AT)
        assert [record.step for record in explanation.steps] == [
            "override",
            "status",
            "schedule",
            "targeting",
            "holdout",
            "layer",
            "coverage",
            "bucket",
        ]
        text = json.dumps([record.detail for record in explanation.steps])
        assert "secret-plan-value" not in text
        assert "2026-01-01" not in text
        decided = [record for record in explanation.steps if record.outcome == "decided"]
        assert len(decided) == 1
        after = explanation.steps[explanation.steps.index(decided[0]) + 1 :]
        assert {record.outcome for record in after} <= {"not reached", "not configured"}
        assert all(record.hash_value is None for record in after)


@FAST
@given(
    user=st.text(min_size=1, max_size=12).filter(lambda u: u.isprintable()),
    value=HOSTILE,
    segment=st.sampled_from([None, "vip", "other"]),
    offset=st.integers(min_value=-400, max_value=400),
)
def test_decisions_agree_with_the_reference_and_never_raise(user, value, segment, offset):
    """Random users, hostile contexts and times through every edge experiment: the reference's answer."""
    at = AT + timedelta(days=offset)
    at_text = format_instant(instant_of_datetime(at) or 0)
    contexts = [{"age": value, "plan": value, "signup_at": value, "country": value, "app_version": value}, None]
    compiled = _edges()
    for experiment_id in ("everything", "targeted", "scheduled", "held_layer", "seg_cov", "launched_override"):
        for context in contexts:
            decision = compiled.experiments[experiment_id].decide(user, segment, context, at)
            expected = ref.decide(cases.EDGES, experiment_id, user, segment, context, at_text)
            assert (decision.variant_id, decision.reason, decision.hash_value) == (
                expected["variant_id"],
                expected["reason"],
                expected["hash_value"],
            )


def test_huge_contexts_decide_quickly_and_safely():
    """64 keys of 1,024-character strings and deep nesting: a decision, no exception."""
    context: dict[str, Any] = {f"k{i}": "9" * 1024 for i in range(60)}
    context |= {"age": [[[[1]]]], "plan": {"a": {"b": {"c": 1}}}, "signup_at": "x" * 1024, "app_version": "1" * 1024}
    decision = _edges().experiments["everything"].decide("u1", None, context, AT)
    assert decision.reason == "targeting"


# --- the file -----------------------------------------------------------------------------------------


def test_the_issue_example_loads_from_yaml_with_unquoted_times():
    """YAML reads unquoted times as datetimes: normalised to UTC; a naive one is refused by the model."""
    text = """
layers: [{id: checkout, salt: checkout-2026}]
holdouts: [{id: q1-holdout, share: 0.05}]
experiments:
  - id: exp_cta
    split: {control: 0.5, blue: 0.5}
    start_at: 2026-12-01T01:00:00+01:00
    coverage: 0.10
    layer: {id: checkout, range: [0.0, 0.5]}
    holdouts: [q1-holdout]
    targeting: {country: {$in: [US, CA]}, app_version: {$vgte: "5.2.0"}}
    overrides: {qa-user-1: blue, qa-user-2: control}
"""
    document = yaml.safe_load(text)
    compiled = _compile(document)
    assert compiled.configs["exp_cta"].start_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert compiled.experiments["exp_cta"].config_version == ref.config_version(cases.ISSUE, "exp_cta")
    document["experiments"][0]["start_at"] = datetime(2026, 12, 1)
    with pytest.raises(ValidationError, match="time zone"):
        ExperimentFile.model_validate(document)


def test_stopped_and_launched_experiments_free_their_layer_range():
    """Only draft and running experiments hold a range; setting an old one running again is refused."""
    old = {"id": "old", "split": {"A": 1.0}, "status": "stopped", "layer": {"id": "L", "range": [0, 0.5]}}
    new = {"id": "new", "split": {"A": 1.0}, "layer": {"id": "L", "range": [0.25, 0.75]}}
    document: dict[str, Any] = {"layers": [{"id": "L"}], "experiments": [old, new]}
    _compile(document)
    document["experiments"][0] = {**old, "status": "launched", "launched": "A"}
    _compile(document)
    document["experiments"][0] = {**old, "status": "draft"}
    with pytest.raises(ConfigurationError, match="overlaps"):
        _compile(document)


def test_config_version_digests_what_decides_and_nothing_else():
    """Labels and metadata leave it alone; defaults written out leave it alone; a decision input moves it."""
    base = {"id": "e", "split": {"A": 0.5, "B": 0.5}, "holdouts": ["H", "G"]}
    top = {"holdouts": [{"id": "H", "share": 0.1}, {"id": "G", "share": 0.2}]}

    def version(**fields: Any) -> str:
        return _compile({**top, "experiments": [{**base, **fields}]}).experiments["e"].config_version

    same = {
        version(),
        version(version="9", description="d", variants={"A": {"tone": "x"}}),
        version(control="A", status="running", coverage=1, targeting={}, seed="echovoice"),
        version(holdouts=["G", "H"]),
    }
    assert len(same) == 1
    moved = {version(coverage=0.5), version(control="B"), version(overrides={"q": "A"}), version(targeting={"a": 1})}
    assert len(moved) == 4
    assert not same & moved


# --- safe edits ---------------------------------------------------------------------------------------


def _edit(old_fields: dict[str, Any], new_fields: dict[str, Any], **kwargs: Any) -> Any:
    def document(fields: dict[str, Any]) -> dict[str, Any]:
        return {"experiments": [{"id": "e", "split": {"A": 0.5, "B": 0.5}, **fields}]}

    return changes(_compile(document(old_fields)), _compile(document(new_fields)), at=AT, **kwargs)


def test_ramping_up_moves_only_newcomers_and_ramping_down_is_refused():
    """0.1 → 0.5 changes 40% of users (all newly exposed) and is allowed; 0.5 → 0.1 is refused."""
    up = _edit({"coverage": 0.1}, {"coverage": 0.5}, sample=20_000)
    assert not up.refused
    assert up.experiments[0].moved_share == pytest.approx(0.4, abs=0.02)
    assert up.experiments[0].changed == ("coverage: 0.1 → 0.5",)
    down = _edit({"coverage": 0.5}, {"coverage": 0.1}, sample=2_000)
    assert down.refused
    assert down.refusal_message("f.yaml") == (
        "f.yaml: experiment 'e': coverage lowered from 0.5 to 0.1; change its version to apply this edit"
    )


def test_the_estimate_is_per_segment_split():
    """A segment split added: no change without a segment, about 40% of that segment's users move."""
    report = _edit({}, {"segments": {"vip": {"A": 0.1, "B": 0.9}}}, sample=20_000).experiments[0]
    assert report.refused
    assert report.moved_share == 0.0
    assert report.segment_moved_share["vip"] == pytest.approx(0.4, abs=0.02)


def test_the_estimate_ignores_targeting_and_counts_lifecycle():
    """Targeting is taken as matched (contexts are unknown); stopping moves everyone out of the experiment."""
    report = _edit(
        {"targeting": {"country": "US"}}, {"targeting": {"country": "US"}, "status": "stopped"}, sample=1_000
    )
    assert not report.refused
    assert report.experiments[0].moved_share == 1.0


def test_unchanged_experiments_report_nothing():
    """Identical files: every experiment unchanged, nothing refused, nothing estimated."""
    report = _edit({"coverage": 0.3}, {"coverage": 0.3})
    assert [(change.kind, change.moved_share, change.refused) for change in report.experiments] == [
        ("unchanged", 0.0, False)
    ]


def test_files_without_the_new_fields_validate_and_compile_to_the_seed_rule():
    """The demo file's experiments that set no allocation field get every default and compile to bucket-only
    walks; the ones that set some compile to more."""
    document = yaml.safe_load(
        (cases.CASES_PATH.parent.parent / "deploy" / "experiments.yaml").read_text(encoding="utf-8")
    )
    plain = {item["id"] for item in document["experiments"] if set(item) <= claims.PLAIN_FIELDS}
    assert {"exp_001", "exp_personalization_001", "exp_tone_abcd"} <= plain
    parsed = ExperimentFile.model_validate(document)
    for config in parsed.experiments:
        if config.id in plain:
            assert (config.status, config.coverage, config.layer, config.holdouts, config.targeting) == (
                "running",
                1.0,
                None,
                [],
                None,
            )
            assert config.overrides == {}
    compiled = compile_file(parsed, "deploy/experiments.yaml")
    walks = {experiment.experiment_id: tuple(step.name for step in experiment.steps) for experiment in compiled}
    assert {walks[experiment_id] for experiment_id in plain} == {("bucket",)}
    assert all(len(walk) > 1 for experiment_id, walk in walks.items() if experiment_id not in plain)
