"""Regenerate ``schemas/allocation-cases.json``: ``python -m tests.allocation_cases`` (``make schemas``).

Expected decisions, hashes, matches, version orders, instants and digests come from
:mod:`tests.allocation_reference` (the plain restatement of ``docs/allocation.md``), never from
``worker.domain.allocation``. What must be refused at load, and which edits a reload refuses, are
known answers written here by hand from the page. The optimised batch hash is used only to *search*
for user ids whose hash lands exactly on an edge (as ``tests.conformance_cases`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import allocation_reference as ref
from tests.reference import ReferenceAgent

CASES_PATH = Path(__file__).resolve().parent.parent / "schemas" / "allocation-cases.json"
AT = "2026-12-07T12:00:00Z"


#: Users found by :func:`find_user` before (a search costs seconds; each is re-checked with the reference).
FOUND: dict[tuple[str, str, int], str] = {
    ("echovoice", "exp_float_edge", 300000): "e218648",
    ("coverage:echovoice", "cov_quarter", 249999): "e3199755",
    ("coverage:echovoice", "cov_quarter", 250000): "e2269521",
    ("coverage:echovoice", "cov_odd", 123456): "e430790",
    ("coverage:echovoice", "cov_odd", 123457): "e121393",
    ("layer", "page", 0): "e294220",
    ("layer", "page", 299999): "e1238789",
    ("layer", "page", 300000): "e300417",
    ("layer", "page", 599999): "e86440",
    ("layer", "page", 600000): "e247643",
    ("layer", "page", 999999): "e545371",
    ("layer", "floaty", 99999): "e303300",
    ("layer", "floaty", 100000): "e2030694",
    ("layer", "floaty", 300000): "e676298",
    ("layer", "floaty", 300001): "e821043",
    ("holdout", "h5", 0): "e589144",
    ("holdout", "h5", 49999): "e1370650",
    ("holdout", "h5", 50000): "e1162733",
}


def find_user(prefix_a: str, prefix_b: str, target: int, stem: str = "e", limit: int = 30_000_000) -> str:
    """The first ``{stem}{i}`` whose ``h_int`` of ``f"{prefix_a}:{prefix_b}:{user}"`` is ``target``."""
    from worker.domain.assignment import bucket_ints

    known = FOUND.get((prefix_a, prefix_b, target))
    if known is not None and ref.h_int(f"{prefix_a}:{prefix_b}:{known}") == target:
        return known

    chunk = 500_000
    for start in range(0, limit, chunk):
        users = [f"{stem}{i}" for i in range(start, start + chunk)]
        values = bucket_ints(prefix_a, prefix_b, users)
        hits = (values == target).nonzero()[0]
        if len(hits):
            user = users[int(hits[0])]
            assert ref.h_int(f"{prefix_a}:{prefix_b}:{user}") == target
            print(f"new edge user, add to FOUND: {(prefix_a, prefix_b, target)!r}: {user!r},")
            return user
    raise LookupError(f"no user for {prefix_a}:{prefix_b} = {target}")


# --- the configurations -----------------------------------------------------------------------------

PLAIN: dict[str, Any] = {
    "experiments": [
        {"id": "exp_001", "split": {"A": 0.5, "B": 0.5}},
        {"id": "exp_three", "seed": "custom_seed_v2", "split": {"control": 0.5, "test_1": 0.3, "test_2": 0.2}},
        {"id": "exp_segments", "split": {"A": 0.5, "B": 0.5}, "segments": {"high_intent": {"A": 0.4, "B": 0.6}}},
        {"id": "exp_float_edge", "version": "7", "split": {"A": 0.1, "B": 0.2, "C": 0.7}},
    ]
}

ISSUE: dict[str, Any] = {
    "layers": [{"id": "checkout", "salt": "checkout-2026"}],
    "holdouts": [{"id": "q1-holdout", "salt": "q1-holdout", "share": 0.05}],
    "experiments": [
        {
            "id": "exp_cta",
            "split": {"control": 0.5, "blue": 0.5},
            "control": "control",
            "status": "running",
            "start_at": "2026-12-01T00:00:00Z",
            "coverage": 0.10,
            "layer": {"id": "checkout", "range": [0.0, 0.5]},
            "holdouts": ["q1-holdout"],
            "targeting": {"country": {"$in": ["US", "CA"]}, "app_version": {"$vgte": "5.2.0"}},
            "overrides": {"qa-user-1": "blue", "qa-user-2": "control"},
        }
    ],
}

AB = {"A": 0.5, "B": 0.5}
EDGES: dict[str, Any] = {
    "layers": [{"id": "page"}, {"id": "page2", "salt": "page2-salt"}, {"id": "floaty"}],
    "holdouts": [{"id": "h5", "share": 0.05}, {"id": "h_all", "share": 1}, {"id": "h_none", "share": 0}],
    "experiments": [
        {"id": "cov_zero", "split": AB, "coverage": 0},
        {"id": "cov_one", "split": AB, "coverage": 1},
        {"id": "cov_quarter", "split": AB, "coverage": 0.25},
        {"id": "cov_odd", "split": AB, "coverage": 0.1234565},
        {"id": "layer_a", "split": AB, "layer": {"id": "page", "range": [0.0, 0.3]}},
        {"id": "layer_b", "split": AB, "layer": {"id": "page", "range": [0.3, 0.6]}},
        {"id": "layer_c", "split": AB, "layer": {"id": "page", "range": [0.6, 1.0]}},
        {"id": "float_range", "split": AB, "layer": {"id": "floaty", "range": [0.1, 0.30000000000000004]}},
        {"id": "held", "split": AB, "holdouts": ["h5"]},
        {"id": "held_all", "split": AB, "holdouts": ["h_all"]},
        {"id": "held_none", "split": AB, "holdouts": ["h_none"]},
        {"id": "held_layer", "split": AB, "holdouts": ["h5"], "layer": {"id": "page2", "range": [0.5, 1.0]}},
        {"id": "held_twice", "split": AB, "holdouts": ["h_none", "h5"]},
        {
            "id": "seg_cov",
            "split": AB,
            "segments": {"vip": {"A": 0.1, "B": 0.9}},
            "coverage": 0.5,
        },
        {"id": "control_sorted", "split": {"a": 0.5, "B": 0.5}, "status": "stopped"},
        {"id": "control_named", "split": {"treatment": 0.5, "control": 0.5}, "status": "stopped"},
        {"id": "control_explicit", "split": AB, "control": "B", "status": "stopped"},
        {"id": "draft_override", "split": AB, "status": "draft", "overrides": {"qa": "B"}},
        {"id": "stopped_override", "split": AB, "status": "stopped", "overrides": {"qa": "B"}},
        {"id": "launched_override", "split": AB, "status": "launched", "launched": "B", "overrides": {"qa": "A"}},
        {
            "id": "scheduled",
            "split": AB,
            "start_at": "2026-12-01T00:00:00Z",
            "end_at": "2027-01-01T00:00:00+01:00",
            "overrides": {"qa": "B"},
        },
        {
            "id": "targeted",
            "split": AB,
            "targeting": {"country": {"$in": ["US", "CA"]}, "app_version": {"$vgte": "5.2"}},
        },
        {"id": "launched_targeted", "split": AB, "status": "launched", "launched": "B", "targeting": {"country": "US"}},
        {
            "id": "everything",
            "version": "3",
            "split": {"control": 0.34, "v1": 0.33, "v2": 0.33},
            "segments": {"vip": {"control": 0.5, "v1": 0.25, "v2": 0.25}},
            "start_at": "2026-11-30T23:00:00-01:00",
            "end_at": "2027-06-01T00:00:00.5Z",
            "coverage": 0.75,
            "layer": {"id": "page2", "range": [0.0, 0.5]},
            "holdouts": ["h5"],
            "targeting": {
                "$or": [{"plan": "pro"}, {"segment": "vip"}],
                "age": {"$gte": 18, "$lt": 65.5},
                "$not": {"blocked": True},
                "signup_at": {"$lt": "2026-12-01T01:00:00+01:00"},
            },
            "overrides": {f"qa-{i}": ["control", "v1", "v2"][i % 3] for i in range(10)},
        },
    ],
}

CONFIGS = {"plain": PLAIN, "issue": ISSUE, "edges": EDGES}
US_CONTEXT = {"country": "US", "app_version": "5.3.0"}
FULL_CONTEXT = {"plan": "pro", "age": 30, "signup_at": "2026-01-01T00:00:00Z"}


def _case(name: str, config: str, experiment_id: str, user_id: str, **request: Any) -> dict[str, Any]:
    document = CONFIGS[config]
    segment, context, at = request.get("segment"), request.get("context"), request.get("at", AT)
    return {
        "name": name,
        "config": config,
        "experiment_id": experiment_id,
        "user_id": user_id,
        "segment": segment,
        "context": context,
        "at": at,
        **ref.decide(document, experiment_id, user_id, segment, context, at),
        "hashes": ref.hashes(document, experiment_id, user_id),
    }


def _users(config: str, experiment_id: str, want: str, count: int, **request: Any) -> list[str]:
    """The first ``count`` users ``u0, u1, ...`` the reference decides with reason ``want``."""
    found = []
    for i in range(100_000):
        user = f"u{i}"
        decided = ref.decide(
            CONFIGS[config], experiment_id, user, request.get("segment"), request.get("context"), request.get("at", AT)
        )
        if decided["reason"] == want:
            found.append(user)
            if len(found) == count:
                return found
    raise LookupError(f"fewer than {count} users decided {want} in {experiment_id}")


def plain_cases() -> list[dict[str, Any]]:
    """Experiments without the new fields: the seed rule, checked against the seed's restatement too."""
    cases = []
    for experiment in PLAIN["experiments"]:
        for i in range(12):
            user = f"user-{i * 7919}"
            segment = "high_intent" if experiment["id"] == "exp_segments" and i % 2 else None
            case = _case("plain: the seed rule", "plain", experiment["id"], user, segment=segment)
            split = experiment.get("segments", {}).get(segment, experiment["split"]) if segment else experiment["split"]
            seed = ReferenceAgent(split, seed=experiment.get("seed", "echovoice")).assign_user(user, experiment["id"])
            assert (case["variant_id"], case["hash_value"]) == (seed["variant_id"], seed["hash_value"])
            cases.append(case)
    user = find_user("echovoice", "exp_float_edge", 300_000)
    cases.append(_case("plain: bucket 0.3 is B under 0.1/0.2/0.7 (float sums)", "plain", "exp_float_edge", user))
    return cases


def issue_cases() -> list[dict[str, Any]]:
    """The issue's example experiment: every reason it can give."""
    cases = [
        _case("override beats everything while running", "issue", "exp_cta", "qa-user-1"),
        _case("override to control", "issue", "exp_cta", "qa-user-2", context={"country": "FR"}),
        _case("override before start_at", "issue", "exp_cta", "qa-user-1", at="2026-11-01T00:00:00Z"),
        _case("before start_at", "issue", "exp_cta", "u1", context=US_CONTEXT, at="2026-11-30T23:59:59.999999Z"),
        _case(
            "at start_at exactly (inclusive)", "issue", "exp_cta", "u1", context=US_CONTEXT, at="2026-12-01T00:00:00Z"
        ),
        _case(
            "targeting: country not in the list",
            "issue",
            "exp_cta",
            "u1",
            context={"country": "FR", "app_version": "9"},
        ),
        _case("targeting: no context", "issue", "exp_cta", "u1"),
        _case(
            "targeting: version too old", "issue", "exp_cta", "u1", context={"country": "US", "app_version": "5.1.9"}
        ),
        _case(
            "targeting: pre-release below 5.2.0",
            "issue",
            "exp_cta",
            "u1",
            context={"country": "CA", "app_version": "5.2.0-rc.1"},
        ),
        _case("targeting: version a number", "issue", "exp_cta", "u1", context={"country": "CA", "app_version": 5.3}),
    ]
    for reason in ("holdout", "layer", "coverage", "bucketed"):
        for user in _users("issue", "exp_cta", reason, 3, context=US_CONTEXT):
            cases.append(_case(f"issue example: {reason}", "issue", "exp_cta", user, context=US_CONTEXT))
    return cases


def edge_cases() -> list[dict[str, Any]]:
    """Every step at its boundaries."""
    cases: list[dict[str, Any]] = []

    def add(name: str, experiment_id: str, user: str, **request: Any) -> None:
        cases.append(_case(name, "edges", experiment_id, user, **request))

    for user in ("u1", "u2", "u3"):
        add("coverage 0 exposes nobody", "cov_zero", user)
        add("coverage 1 exposes everyone", "cov_one", user)
    for target, label in ((249_999, "below"), (250_000, "exactly at")):
        add(f"coverage hash {label} 0.25", "cov_quarter", find_user("coverage:echovoice", "cov_quarter", target))
    for target in (123_456, 123_457):
        add(
            f"coverage 0.1234565 against hash {target / 1e6}",
            "cov_odd",
            find_user("coverage:echovoice", "cov_odd", target),
        )
    for target in (0, 299_999, 300_000, 599_999, 600_000, 999_999):
        user = find_user("layer", "page", target)
        for experiment_id in ("layer_a", "layer_b", "layer_c"):
            add(f"layer hash {target / 1e6} against {experiment_id}", experiment_id, user)
    for target in (99_999, 100_000, 300_000, 300_001):
        add(
            f"layer [0.1, 0.30000000000000004) against {target / 1e6}",
            "float_range",
            find_user("layer", "floaty", target),
        )
    for target in (0, 49_999, 50_000):
        user = find_user("holdout", "h5", target)
        add(f"holdout share 0.05 against {target / 1e6}", "held", user)
        add(f"holdout checked before the layer ({target / 1e6})", "held_layer", user)
        add(f"second listed holdout holds out ({target / 1e6})", "held_twice", user)
    for user in ("u1", "u2"):
        add("holdout share 1 holds out everyone", "held_all", user)
        add("holdout share 0 holds out nobody", "held_none", user)
    for user in _users("edges", "held_layer", "layer", 2) + _users("edges", "held_layer", "bucketed", 2):
        add("holdout and layer together", "held_layer", user)
    for segment in (None, "vip", "unknown_segment"):
        for user in _users("edges", "seg_cov", "bucketed", 3, segment=segment) + _users(
            "edges", "seg_cov", "coverage", 1, segment=segment
        ):
            add(f"segment split with coverage (segment {segment})", "seg_cov", user, segment=segment)
    add("default control: first variant in code-point order (B < a)", "control_sorted", "u1")
    add("default control: the variant named control", "control_named", "u1")
    add("explicit control", "control_explicit", "u1")
    add("override applies in draft", "draft_override", "qa")
    add("draft serves control", "draft_override", "u1")
    add("override does not apply when stopped", "stopped_override", "qa")
    add("override does not apply when launched", "launched_override", "qa")
    add("launched serves the launched variant", "launched_override", "u1")
    add("launched beats targeting", "launched_targeted", "u1", context={"country": "FR"})
    schedule = (
        ("one microsecond before start_at", "2026-11-30T23:59:59.999999Z"),
        ("start_at is inclusive", "2026-12-01T00:00:00Z"),
        ("start_at in another offset", "2026-12-01T01:00:00+01:00"),
        ("one microsecond before end_at (end_at has an offset)", "2026-12-31T22:59:59.999999Z"),
        ("end_at is exclusive", "2026-12-31T23:00:00Z"),
        ("after end_at", "2027-02-01T00:00:00Z"),
        ("digits past the sixth are dropped (still before start_at)", "2026-11-30T23:59:59.9999999Z"),
    )
    for label, at in schedule:
        add(label, "scheduled", "u1", at=at)
        add(f"override while running: {label}", "scheduled", "qa", at=at)
    contexts: list[tuple[str, Any, str | None]] = [
        ("match", {"country": "US", "app_version": "5.2"}, None),
        ("1.2 equals 1.2.0", {"country": "CA", "app_version": "5.2.0"}, None),
        ("build metadata ignored", {"country": "CA", "app_version": "5.2.0+b7"}, None),
        ("missing version", {"country": "US"}, None),
        ("null is missing", {"country": "US", "app_version": None}, None),
        ("country lower case", {"country": "us", "app_version": "6"}, None),
        ("malformed version", {"country": "US", "app_version": "v5.3"}, None),
        ("context empty", {}, None),
        ("no context", None, None),
    ]
    for label, context, segment in contexts:
        add(f"targeting: {label}", "targeted", "u1", context=context, segment=segment)
    full = [
        ("full context", FULL_CONTEXT, None),
        ("vip segment instead of plan", {"age": 18, "signup_at": "2026-11-30T23:59:59.999999Z"}, "vip"),
        ("age at upper bound (exclusive 65.5)", {**FULL_CONTEXT, "age": 65.5}, None),
        ("signup at the bound in UTC (exclusive)", {**FULL_CONTEXT, "signup_at": "2026-12-01T00:00:00Z"}, None),
        ("blocked", {**FULL_CONTEXT, "blocked": True}, None),
        ("blocked as a string is not true", {**FULL_CONTEXT, "blocked": "true"}, None),
        ("age as a string", {**FULL_CONTEXT, "age": "30"}, None),
    ]
    for label, context, segment in full:
        for user in ("u1", "u7", "qa-4"):
            add(f"everything: {label}", "everything", user, context=context, segment=segment)
        for reason in ("holdout", "layer", "coverage", "bucketed"):
            if label == "full context" or label.startswith("vip"):
                for user in _users("edges", "everything", reason, 2, context=context, segment=segment):
                    add(f"everything: {label}: {reason}", "everything", user, context=context, segment=segment)
    return cases


# --- conditions, versions, times --------------------------------------------------------------------

ATTRIBUTE_VALUES: list[Any] = [
    "US", "", 5, 5.0, 2.5, -0.0, True, False, None, [5, "US"], {"a": 1}, "5.2.0", "5.10.0-rc.1",
    "2026-06-01T00:00:00Z", "2026-06-01T02:00:00+02:00", "2026-06-01T00:00:00.0000009Z", "not a time",
    1e300, 12345678901234567890,
]  # fmt: skip
OPERATOR_TESTS: list[Any] = [
    "US", 5, True, {"$eq": "US"}, {"$eq": 5.0}, {"$eq": False}, {"$eq": ""},
    {"$ne": "US"}, {"$ne": 5}, {"$ne": True},
    {"$in": ["US", "CA"]}, {"$in": [5, "5", True]}, {"$in": [0]},
    {"$nin": ["US", "CA"]}, {"$nin": [5]}, {"$nin": [True]}, {"$nin": ["x", 1]},
    {"$gt": 2.5}, {"$gte": 5}, {"$lt": 5}, {"$lte": 5.0}, {"$gt": -1e300}, {"$lt": 1e301},
    {"$gte": 12345678901234567000}, {"$gte": 2.5, "$lt": 5},
    {"$gt": "2026-05-31T23:59:59.999999Z"}, {"$lte": "2026-06-01T00:00:00Z"}, {"$lt": "2026-06-01T00:00:00.000001Z"},
    {"$gte": "2026-06-01T01:00:00+01:00"},
    {"$exists": True}, {"$exists": False},
    {"$veq": "5.2"}, {"$vgt": "5.2.0-rc.1"}, {"$vgte": "5.2.0"}, {"$vlt": "5.10.0"}, {"$vlte": "5.2.0+build"},
    {"$vgt": "5.9.9"}, {"$vlt": "5.10.0"},
]  # fmt: skip
COMBINED: list[tuple[dict[str, Any], Any, str | None]] = [
    ({}, None, None),
    ({}, {"a": 1}, None),
    ({"segment": "vip"}, None, "vip"),
    ({"segment": "vip"}, {"segment": "vip"}, None),
    ({"segment": "vip"}, {"segment": "vip"}, "other"),
    ({"segment": {"$exists": False}}, {"segment": "vip"}, None),
    ({"device.os": "ios"}, {"device": {"os": "ios"}}, None),
    ({"device.os": "ios"}, {"device.os": "ios"}, None),
    ({"$not": {"country": "US"}}, {}, None),
    ({"$not": {"country": "US"}}, {"country": "US"}, None),
    ({"$not": {"country": "US"}}, {"country": 5}, None),
    ({"$or": [{"a": 1}, {"b": 2}]}, {"b": 2}, None),
    ({"$or": [{"a": 1}, {"b": 2}]}, {"b": "2"}, None),
    ({"$and": [{"a": 1}, {"b": 2}]}, {"a": 1, "b": 2}, None),
    ({"$and": [{"a": 1}, {"b": 2}]}, {"a": 1}, None),
    ({"$and": [{"a": {"$exists": False}}], "$or": [{"b": {"$exists": False}}]}, {}, None),
    ({"$not": {"$or": [{"a": 1}, {"$not": {"b": {"$exists": True}}}]}}, {"b": 0}, None),
    ({"a": 1, "b": {"$in": ["x"]}}, {"a": 1, "b": "x"}, None),
    ({"a": 1, "b": {"$in": ["x"]}}, {"a": 1, "b": "y"}, None),
    (
        {"$not": {"$not": {"$not": {"$not": {"$not": {"$not": {"$not": {"$not": {"a": 1}}}}}}}}},
        {"a": 1},
        None,
    ),
]


def condition_cases() -> list[dict[str, Any]]:
    """Every operator against every kind of value (missing included), and the combinators."""
    cases: list[dict[str, Any]] = []
    for test in OPERATOR_TESTS:
        for value in ATTRIBUTE_VALUES:
            context = {} if value is None else {"x": value}
            condition = {"x": test}
            cases.append({"condition": condition, "context": context, "segment": None,
                          "matches": ref.condition_matches(condition, context, None)})  # fmt: skip
    for condition, context, segment in COMBINED:
        cases.append({"condition": condition, "context": context, "segment": segment,
                      "matches": ref.condition_matches(condition, context, segment)})  # fmt: skip
    return cases


#: (condition, paths of the problems) — refused at load; written by hand from §2.5. The JSON Schema
#: refuses each too, except what a pattern cannot see: :data:`CALENDAR_ONLY`.
INVALID_CONDITIONS: list[tuple[Any, list[str]]] = [
    ({"a": {"$regex": "^x"}}, ["targeting.a.$regex"]),
    ({"$regex": "x"}, ["targeting.$regex"]),
    ({"a": {"$foo": 1}}, ["targeting.a.$foo"]),
    ({"$foo": [{"a": 1}]}, ["targeting.$foo"]),
    ({"$eq": 1}, ["targeting.$eq"]),
    ({"a": {"$gt": "m"}}, ["targeting.a.$gt"]),
    ({"a": {"$gt": True}}, ["targeting.a.$gt"]),
    ({"a": {"$gt": [1]}}, ["targeting.a.$gt"]),
    ({"a": {"$lt": "2026-12-01T00:00:00"}}, ["targeting.a.$lt"]),
    ({"a": {"$lt": "2026-12-01"}}, ["targeting.a.$lt"]),
    ({"a": {"$lt": "2026-02-30T00:00:00Z"}}, ["targeting.a.$lt"]),
    ({"a": {"$veq": "v1.2.3"}}, ["targeting.a.$veq"]),
    ({"a": {"$vgt": "01.2"}}, ["targeting.a.$vgt"]),
    ({"a": {"$vlt": "1.2.3.4"}}, ["targeting.a.$vlt"]),
    ({"a": {"$vgte": 5}}, ["targeting.a.$vgte"]),
    ({"a": {"$in": []}}, ["targeting.a.$in"]),
    ({"a": {"$nin": "US"}}, ["targeting.a.$nin"]),
    ({"a": {"$in": ["US", None]}}, ["targeting.a.$in.1"]),
    ({"a": {"$in": [["US"]]}}, ["targeting.a.$in.0"]),
    ({"a": None}, ["targeting.a"]),
    ({"a": ["US", "CA"]}, ["targeting.a"]),
    ({"a": {}}, ["targeting.a"]),
    ({"a": {"$eq": {"b": 1}}}, ["targeting.a.$eq"]),
    ({"a": {"$eq": 1, "b": 2}}, ["targeting.a.b"]),
    ({"a": {"$not": {"$eq": 1}}}, ["targeting.a.$not"]),
    ({"a": {"$exists": "yes"}}, ["targeting.a.$exists"]),
    ({"$and": []}, ["targeting.$and"]),
    ({"$or": {"a": 1}}, ["targeting.$or"]),
    ({"$not": [{"a": 1}]}, ["targeting.$not"]),
    ({"$and": [{"a": {"$bad": 1}}, {"b": {"$gt": "x"}}]}, ["targeting.$and.0.a.$bad", "targeting.$and.1.b.$gt"]),
    ({"a": "x" * 1025}, ["targeting.a"]),
    ({"": 1}, ["targeting."]),
    ({"x" * 1025: 1}, ["targeting." + "x" * 70]),  # the path is cut at 80 characters
    (
        {"$not": {"$not": {"$not": {"$not": {"$not": {"$not": {"$not": {"$not": {"$not": {"a": 1}}}}}}}}}},
        ["targeting.$not.$not.$not.$not.$not.$not.$not.$not.$not"],
    ),
]

#: Invalid conditions the schema's time pattern admits: only a calendar knows February has no 30th.
CALENDAR_ONLY = ({"a": {"$lt": "2026-02-30T00:00:00Z"}},)

VERSION_CHAIN = [
    "0.0.0", "0.9", "1", "1.0.0-0", "1.0.0-9", "1.0.0-10", "1.0.0-0a", "1.0.0-a-b", "1.0.0-alpha", "1.0.0-alpha.1",
    "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.0+build.5",
    "1.2", "1.2.0", "1.2.1", "1.10.0", "2", "2.0.0-0", "10.0.0", "99999999999999999999.0.0",
    "99999999999999999999.0.1",
]  # fmt: skip
INVALID_VERSIONS = [
    "", "v1.2.3", "V1", "01.2.3", "1.02", "1.2.03", "1.2.3.4", "1.2.3-", "1.2.3+", "1.2.3-01", "1..2", "1.",
    ".1", "1.2.3-alpha..1", "1.2.3+b..c", " 1.2.3", "1.2.3 ", "1.2.3\n", "١.٢.٣", "1.2.3-ü", "a.b.c",
    "1.2.3+build!", "1.2.3-rc_1", "-1.2.3", "1.2.3-" + "a" * 251, "+1",
]  # fmt: skip
TIMES = [
    "2026-12-01T00:00:00Z", "2026-12-01t00:00:00z", "2026-12-01T01:00:00+01:00", "2026-11-30T23:00:00-01:00",
    "2026-12-01T00:00:00-00:00", "2026-12-01T00:00:00.5Z", "2026-12-01T00:00:00.123456Z",
    "2026-12-01T00:00:00.1234567Z", "2026-12-01T00:00:00.123456789Z", "1970-01-01T00:00:00Z",
    "1969-12-31T23:59:59.9999999Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
    "2024-02-29T12:00:00+23:59", "2026-12-01T00:00:00+00:00",
    "2026-02-29T00:00:00Z", "2026-12-01T24:00:00Z", "2026-12-01T00:00:60Z", "2026-12-01T00:60:00Z",
    "2026-13-01T00:00:00Z", "2026-12-01T00:00:00", "2026-12-01", "2026-12-01 00:00:00Z", "2026-12-01T00:00Z",
    "2026-12-01T00:00:00.1234567890Z", "2026-12-01T00:00:00+24:00", "2026-12-01T00:00:00+01:60",
    "0000-01-01T00:00:00Z", "2026-12-01T00:00:00.Z", "2026-12-01T00:00:00+0100", "2026-12-01T00:00:00Z\n",
    "20261201T000000Z", "2026-W49-1T00:00:00Z", "２０２６-12-01T00:00:00Z", "",
]  # fmt: skip


# --- invalid files and edits (known answers by hand) --------------------------------------------------


def _file(*experiments: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**top, "experiments": list(experiments)}


def _exp(experiment_id: str = "e", **fields: Any) -> dict[str, Any]:
    return {"id": experiment_id, "split": {"A": 0.5, "B": 0.5}, **fields}


LAYER = {"layers": [{"id": "L"}]}
HOLDOUT = {"holdouts": [{"id": "H", "share": 0.1}]}
#: (name, file, [(experiment or group label, field)]) — each must be refused with exactly these problems.
INVALID_CONFIGS: list[tuple[str, dict[str, Any], list[list[str | None]]]] = [
    (
        "overlapping ranges in one layer",
        _file(
            _exp("a", layer={"id": "L", "range": [0, 0.5]}), _exp("b", layer={"id": "L", "range": [0.4, 1]}), **LAYER
        ),
        [["experiment", "b", "layer.range"]],
    ),
    ("unknown layer", _file(_exp(layer={"id": "nope", "range": [0, 1]}), **LAYER), [["experiment", "e", "layer.id"]]),
    ("unknown holdout", _file(_exp(holdouts=["nope"])), [["experiment", "e", "holdouts.0"]]),
    ("holdout listed twice", _file(_exp(holdouts=["H", "H"]), **HOLDOUT), [["experiment", "e", "holdouts.1"]]),
    ("override variant not in the split", _file(_exp(overrides={"qa": "C"})), [["experiment", "e", "overrides.qa"]]),
    ("launched without a variant", _file(_exp(status="launched")), [["experiment", "e", "launched"]]),
    ("launched not in the split", _file(_exp(status="launched", launched="C")), [["experiment", "e", "launched"]]),
    ("launched without status launched", _file(_exp(launched="A")), [["experiment", "e", "launched"]]),
    ("control not in the split", _file(_exp(control="C")), [["experiment", "e", "control"]]),
    (
        "end_at before start_at",
        _file(_exp(start_at="2026-12-02T00:00:00Z", end_at="2026-12-01T00:00:00Z")),
        [["experiment", "e", "end_at"]],
    ),
    (
        "end_at equal to start_at",
        _file(_exp(start_at="2026-12-01T01:00:00+01:00", end_at="2026-12-01T00:00:00Z")),
        [["experiment", "e", "end_at"]],
    ),
    ("duplicate layer ids", _file(_exp(), layers=[{"id": "L"}, {"id": "L"}]), [["layer", "L", None]]),
    (
        "duplicate holdout ids",
        _file(_exp(), holdouts=[{"id": "H", "share": 0.1}, {"id": "H", "share": 0.2}]),
        [["holdout", "H", None]],
    ),
    (
        "invalid targeting",
        _file(_exp(targeting={"a": {"$regex": "x"}, "b": {"$vgt": "1.2.3.4"}})),
        [["experiment", "e", "targeting.a.$regex"], ["experiment", "e", "targeting.b.$vgt"]],
    ),
    (
        "several problems at once",
        _file(_exp("a", control="Z", overrides={"q": "Z"}), _exp("b", holdouts=["X"])),
        [["experiment", "a", "control"], ["experiment", "a", "overrides.q"], ["experiment", "b", "holdouts.0"]],
    ),
]
#: Refused by the models before the algebra sees them (schema and pydantic): (name, file, field path).
INVALID_MODELS: list[tuple[str, dict[str, Any], str]] = [
    ("coverage above 1", _file(_exp(coverage=1.5)), "experiments.0.coverage"),
    ("coverage below 0", _file(_exp(coverage=-0.1)), "experiments.0.coverage"),
    ("coverage a string", _file(_exp(coverage="0.5")), "experiments.0.coverage"),
    ("coverage a boolean", _file(_exp(coverage=True)), "experiments.0.coverage"),
    (
        "layer range outside [0, 1]",
        _file(_exp(layer={"id": "L", "range": [0.5, 1.5]}), **LAYER),
        "experiments.0.layer.range.1",
    ),
    ("layer range empty", _file(_exp(layer={"id": "L", "range": [0.5, 0.5]}), **LAYER), "experiments.0.layer.range"),
    ("layer range reversed", _file(_exp(layer={"id": "L", "range": [0.6, 0.5]}), **LAYER), "experiments.0.layer.range"),
    ("holdout share above 1", _file(_exp(), holdouts=[{"id": "H", "share": 2}]), "holdouts.0.share"),
    ("unknown status", _file(_exp(status="paused")), "experiments.0.status"),
    ("start_at without a zone", _file(_exp(start_at="2026-12-01T00:00:00")), "experiments.0.start_at"),
    ("start_at a date", _file(_exp(start_at="2026-12-01")), "experiments.0.start_at"),
    ("start_at a number", _file(_exp(start_at=1764547200)), "experiments.0.start_at"),
    (
        "override user id with a control character",
        _file(_exp(overrides={"qa\u0000": "A"})),
        "experiments.0.overrides.qa\u0000.[key]",
    ),
]

BASE = _file(
    _exp("e", coverage=0.5, layer={"id": "L", "range": [0.2, 0.6]}, holdouts=["H"], targeting={"country": "US"}),
    _exp("other", holdouts=["H"]),
    _exp("free"),
    layers=[{"id": "L"}, {"id": "M"}],
    holdouts=[{"id": "H", "share": 0.1}, {"id": "G", "share": 0.2}],
)


def _edit(
    name: str, refused: dict[str, bool], *, experiment: dict[str, Any] | None = None, top: dict[str, Any] | None = None
) -> dict[str, Any]:
    new = json.loads(json.dumps(BASE))
    if experiment is not None:
        new["experiments"][0] = {**new["experiments"][0], **experiment}
        new["experiments"][0] = {k: v for k, v in new["experiments"][0].items() if v is not None}
    if top is not None:
        new.update(top)
    everyone = {e["id"]: False for e in [*BASE["experiments"], *new["experiments"]]}
    return {"name": name, "old": BASE, "new": new, "refused": {**everyone, **refused}}


EDITS = [
    _edit("nothing changed", {}),
    _edit("coverage raised (ramp)", {}, experiment={"coverage": 0.9}),
    _edit("coverage lowered", {"e": True}, experiment={"coverage": 0.4}),
    _edit("coverage lowered with a new version", {}, experiment={"coverage": 0.4, "version": "2"}),
    _edit("split changed", {"e": True}, experiment={"split": {"A": 0.6, "B": 0.4}}),
    _edit("split written in another order: no change", {}, experiment={"split": {"B": 0.5, "A": 0.5}}),
    _edit("seed changed", {"e": True}, experiment={"seed": "other"}),
    _edit("segment split added", {"e": True}, experiment={"segments": {"vip": {"A": 0.1, "B": 0.9}}}),
    _edit("control changed", {"e": True}, experiment={"control": "B"}),
    _edit("default control written out: no change", {}, experiment={"control": "A"}),
    _edit("layer widened", {}, experiment={"layer": {"id": "L", "range": [0.1, 0.7]}}),
    _edit("layer narrowed", {"e": True}, experiment={"layer": {"id": "L", "range": [0.3, 0.6]}}),
    _edit("layer moved", {"e": True}, experiment={"layer": {"id": "L", "range": [0.3, 0.7]}}),
    _edit("layer changed to another layer (salt)", {"e": True}, experiment={"layer": {"id": "M", "range": [0.2, 0.6]}}),
    _edit("layer to the whole of another layer", {}, experiment={"layer": {"id": "M", "range": [0, 1]}}),
    _edit("layer removed", {}, experiment={"layer": None}),
    _edit("layer salt changed", {"e": True}, top={"layers": [{"id": "L", "salt": "L-2"}, {"id": "M"}]}),
    _edit(
        "holdout share raised (every experiment listing it)",
        {"e": True, "other": True},
        top={"holdouts": [{"id": "H", "share": 0.2}, {"id": "G", "share": 0.2}]},
    ),
    _edit("holdout share lowered", {}, top={"holdouts": [{"id": "H", "share": 0.05}, {"id": "G", "share": 0.2}]}),
    _edit(
        "holdout salt changed",
        {"e": True, "other": True},
        top={"holdouts": [{"id": "H", "salt": "H2", "share": 0.1}, {"id": "G", "share": 0.2}]},
    ),
    _edit("holdout newly listed", {"e": True}, experiment={"holdouts": ["H", "G"]}),
    _edit("holdout removed from the list", {}, experiment={"holdouts": []}),
    _edit("unlisted holdout changed", {}, top={"holdouts": [{"id": "H", "share": 0.1}, {"id": "G", "share": 0.9}]}),
    _edit("targeting changed", {"e": True}, experiment={"targeting": {"country": {"$in": ["US", "CA"]}}}),
    _edit("targeting removed", {}, experiment={"targeting": None}),
    _edit("stopped", {}, experiment={"status": "stopped"}),
    _edit("launched", {}, experiment={"status": "launched", "launched": "B"}),
    _edit("end_at moved", {}, experiment={"end_at": "2027-01-01T00:00:00Z"}),
    _edit("start_at set", {}, experiment={"start_at": "2030-01-01T00:00:00Z"}),
    _edit("overrides added", {}, experiment={"overrides": {"qa": "B"}}),
    _edit("variant metadata and description", {}, experiment={"variants": {"A": {"tone": "x"}}, "description": "d"}),
    _edit("experiment added", {}, top={"experiments": [*BASE["experiments"], _exp("new")]}),
    _edit("experiment removed", {}, top={"experiments": BASE["experiments"][:2]}),
]


def build() -> dict[str, Any]:
    """The whole conformance document."""
    return {
        "description": (
            "Known answers for the ab-assignment-worker allocation contract (docs/allocation.md). Any "
            "implementation that decides locally must reproduce every answer."
        ),
        "version": 1,
        "contract": "allocation/1",
        "configs": {
            name: {
                "file": document,
                "config_versions": {e["id"]: ref.config_version(document, e["id"]) for e in document["experiments"]},
            }
            for name, document in CONFIGS.items()
        },
        "cases": plain_cases() + issue_cases() + edge_cases(),
        "conditions": condition_cases(),
        "invalid_conditions": [
            {"condition": c, "problems": paths, "schema_refuses": c not in CALENDAR_ONLY}
            for c, paths in INVALID_CONDITIONS
        ],
        "versions": {
            "order": [
                {"left": a, "right": b, "order": ref.compare_versions(a, b)}
                for a in VERSION_CHAIN
                for b in VERSION_CHAIN
            ],
            "invalid": INVALID_VERSIONS,
        },
        "times": [{"text": text, "micros": ref.time_micros(text)} for text in TIMES],
        "invalid_configs": [{"name": n, "file": f, "problems": p} for n, f, p in INVALID_CONFIGS],
        "invalid_models": [{"name": n, "file": f, "field": p} for n, f, p in INVALID_MODELS],
        "edits": EDITS,
    }


def main() -> int:
    """Write the file."""
    document = build()
    CASES_PATH.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {CASES_PATH} with {len(document['cases'])} decisions and {len(document['conditions'])} conditions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
