"""The wire contract: tolerant reading of requests, strict known fields, limits, fresh JSON Schemas."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas import SCHEMA_VERSION, AssignmentEvent, AssignmentRecord, AssignmentRequest, ExperimentConfig
from schemas.generate import HERE, SCHEMA_FILES, render
from schemas.models import MAX_BODY_BYTES, MAX_ID_CHARS
from schemas.text import REFUSED_CLASS, text_problem
from tests.schema_strategy import from_schema
from worker.domain.errors import PermanentError
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import handle
from worker.service.ports import Delivery


def test_minimal_request():
    """user_id and experiment_id are enough; the rest defaults."""
    request = AssignmentRequest.model_validate({"user_id": "U1", "experiment_id": "exp_001"})
    assert request.schema_version == SCHEMA_VERSION == "1.1"
    assert request.context is None
    assert request.effective_segment() is None


def test_unknown_top_level_fields_are_ignored():
    """A publisher may add fields before the worker knows them."""
    request = AssignmentRequest.model_validate({"user_id": "U1", "experiment_id": "e", "new_field": [1, 2]})
    assert not hasattr(request, "new_field")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"experiment_id": "e"}, "user_id"),
        ({"user_id": 5, "experiment_id": "e"}, "user_id"),
        ({"user_id": "", "experiment_id": "e"}, "user_id"),
        ({"user_id": "x" * 1025, "experiment_id": "e"}, "user_id"),
        ({"user_id": "a\x00b", "experiment_id": "e"}, "user_id"),
        ({"user_id": "U", "experiment_id": None}, "experiment_id"),
        ({"user_id": "U", "experiment_id": "e", "context": []}, "context"),
        ({"user_id": "U", "experiment_id": "e", "context": {f"k{i}": i for i in range(65)}}, "context"),
        ({"user_id": "U", "experiment_id": "e", "context": {"blob": "x" * 17_000}}, "context"),
        ({"user_id": "U", "experiment_id": "e", "schema_version": "2.0"}, "schema_version"),
        ({"user_id": "U", "experiment_id": "e", "segment": 3}, "segment"),
    ],
)
def test_known_fields_are_strict(body, field):
    """Wrong types, empty or oversized values and control characters are rejected, naming the field."""
    with pytest.raises(ValidationError) as info:
        AssignmentRequest.model_validate(body)
    assert field in {str(e["loc"][0]) for e in info.value.errors()}


def test_id_limit_is_inclusive():
    """1024 characters is allowed."""
    assert AssignmentRequest.model_validate({"user_id": "x" * 1024, "experiment_id": "e"}).user_id == "x" * 1024


def test_segment_falls_back_to_context():
    """context.segment is used when segment is absent; segment wins when both are given."""
    body = {"user_id": "U", "experiment_id": "e", "context": {"segment": "high_intent"}}
    assert AssignmentRequest.model_validate(body).effective_segment() == "high_intent"
    assert AssignmentRequest.model_validate(body | {"segment": "low"}).effective_segment() == "low"


def test_context_segment_fallback_follows_the_id_rule():
    """context.segment is used only when it would pass as segment: refused characters are ignored."""
    for bad in ("nel\x85", "rlo\u202e", "s" * 257, ""):
        body = {"user_id": "U", "experiment_id": "e", "context": {"segment": bad}}
        assert AssignmentRequest.model_validate(body).effective_segment() is None


def _event(**overrides):
    fields = {
        "event_id": "id",
        "correlation_id": "c",
        "variant_id": "A",
        "hash_value": 0.25,
        "threshold": (0.0, 0.5),
        "in_experiment": True,
        "reason": "bucketed",
        "experiment_id": "e",
        "experiment_version": "1",
        "config_version": "5e1f0c2d9a8b7c6d",
        "user_id": "U",
        "strategy": "md5_hash",
        "deterministic": True,
        "seed": "echovoice",
        "split_ratio": {"A": 0.5, "B": 0.5},
        "assigned_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    return AssignmentEvent(**(fields | overrides))


def test_record_flattens_event_with_pascal_case_columns():
    """The Kusto row carries the event's values under PascalCase columns."""
    record = AssignmentRecord.from_event(_event(segment=None, request_id=None))
    row = json.loads(record.model_dump_json())
    assert row["EventId"] == "id"
    assert row["Segment"] == ""
    assert row["RequestId"] == ""
    assert row["AssignedAt"] == "2026-01-01T00:00:00Z"
    assert all(name[0].isupper() for name in row)


def test_kusto_column_types():
    """Column types map onto Kusto types."""
    columns = dict(AssignmentRecord.kusto_columns())
    assert columns["HashValue"] == "real"
    assert columns["AssignedAt"] == "datetime"
    assert columns["SplitRatio"] == "dynamic"
    assert columns["EventId"] == "string"


def test_event_rejects_out_of_range_hash():
    """An event's hash_value is in [0, 1)."""
    with pytest.raises(ValidationError):
        _event(hash_value=1.0)


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_committed_json_schemas_are_fresh(name):
    """schemas/*.schema.json equal what the models generate (run python -m schemas.generate)."""
    committed = (HERE / name).read_text(encoding="utf-8")
    assert committed == render(SCHEMA_FILES[name], name), f"schemas/{name} is stale: run python -m schemas.generate"


def test_request_schema_documents_every_field():
    """Every request field has a description for other services."""
    schema = json.loads((HERE / "assignment-request.schema.json").read_text(encoding="utf-8"))
    assert set(schema["properties"]) == {
        "schema_version",
        "request_id",
        "user_id",
        "experiment_id",
        "segment",
        "context",
    }
    assert all("description" in p for p in schema["properties"].values())


# -- the published JSON Schema and the worker agree -------------------------------------------------

REQUEST_SCHEMA = json.loads((HERE / "assignment-request.schema.json").read_text(encoding="utf-8"))
REQUEST_VALIDATOR = Draft202012Validator(REQUEST_SCHEMA)


def worker_verdict(body: dict[str, Any]) -> str:
    """``"accepted"`` or the dead-letter reason the worker's ``handle`` gives this body.

    The experiment is configured whenever its id is a valid one, so only the contract decides.
    """
    raw = json.dumps(body).encode()  # ASCII escapes, so lone surrogates reach the worker as sent
    experiment_id = body.get("experiment_id")
    configs = []
    if text_problem(experiment_id, MAX_ID_CHARS) is None:
        configs = [ExperimentConfig(id=experiment_id, split={"A": 0.5, "B": 0.5})]
    registry = ExperimentRegistry.from_configs(configs)
    delivery = Delivery(body=raw, message_id="m-1", enqueued_time=datetime(2026, 1, 1, tzinfo=UTC))
    allow_all = set(body["context"]) if isinstance(body.get("context"), dict) else set()
    try:
        handled = handle(delivery, registry, context_allow_list=allow_all)
    except PermanentError as error:
        return str(error.reason)
    handled.outbound(delivery)  # the event serialises, context and all
    return "accepted"


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "a\x00b", "experiment_id": "exp_001"},
        {"user_id": "esc\x1b[2J", "experiment_id": "exp_001"},
        {"user_id": "U1", "experiment_id": "exp_001", "context": {f"k{i}": i for i in range(100)}},
        {"user_id": "U1", "experiment_id": "exp_001", "context": {"blob": "x" * 20 * 1024}},
        {"user_id": "U1", "experiment_id": "exp_001", "schema_version": "1.0\n"},
        {"user_id": "nel\x85", "experiment_id": "exp_001"},
        {"user_id": "U1", "experiment_id": "bidi\u202eexp"},
        {"user_id": "zw\u200bsp", "experiment_id": "exp_001"},
        {"user_id": "ls\u2028", "experiment_id": "exp_001"},
        {"user_id": "U1", "experiment_id": "exp_001", "schema_version": "1.\u0663"},
        {"user_id": "U1", "experiment_id": "exp_001", "context": {"deep": [[[[[1]]]]]}},
        {"user_id": "U1", "experiment_id": "exp_001", "context": {"deep": {"a": {"b": {"c": {"d": {}}}}}}},
        {"user_id": "U1", "experiment_id": "exp_001", "context": {"k" * 1025: 1}},
    ],
    ids=lambda body: repr(body)[:40],
)
def test_bodies_the_worker_dead_letters_fail_the_published_schema(body):
    """NUL/ESC/C1/bidi/zero-width ids, 100 keys, a 20 KiB context, "1.0\\n": refused by both."""
    assert worker_verdict(body) == "SchemaValidationFailed"
    assert not REQUEST_VALIDATOR.is_valid(body)


def test_request_schema_has_an_id_and_every_limit():
    """The schema names itself and states the worker's limits (a test of what publishers read)."""
    assert REQUEST_SCHEMA["$id"].endswith("/assignment-request.schema.json")
    context = REQUEST_SCHEMA["properties"]["context"]["anyOf"][0]
    assert context["maxProperties"] == 64
    assert REQUEST_SCHEMA["properties"]["user_id"]["not"]["pattern"] == f"[{REFUSED_CLASS}]"
    for name, model in SCHEMA_FILES.items():
        assert json.loads(render(model, name))["$id"].endswith(f"/{name}")


def _fits_in_a_body(body: dict[str, Any]) -> bool:
    # The body size is the transport's limit, the one no JSON Schema can state.
    return len(json.dumps(body).encode()) <= MAX_BODY_BYTES


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(from_schema(REQUEST_SCHEMA).filter(_fits_in_a_body))
def test_every_schema_valid_body_is_accepted_by_the_worker(body):
    """Bodies generated from the published schema are all assigned (none dead-lettered)."""
    assert worker_verdict(body) == "accepted"


#: One character from each refused range (its ends and a few inside), lone surrogate included.
REFUSED_SAMPLES = [
    *("\x00", "\t", "\n", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9f", "\xad", "\u061c", "\u180e"),
    *("\u200b", "\u200d", "\u200f", "\u2028", "\u2029", "\u202a", "\u202e", "\u2060", "\u2066", "\u206f"),
    *("\ud800", "\udfff", "\ufeff", "\ufff9", "\ufffb"),
]
near_miss_text = st.one_of(
    st.text(max_size=8),
    st.builds("{}{}{}".format, st.text(max_size=3), st.sampled_from(REFUSED_SAMPLES), st.text(max_size=3)),
    st.sampled_from(
        ["", "x" * 1024, "x" * 1025, "s" * 256, "s" * 257, "1.0", "1.12", "1.0\n", "1.\u0663", "2.0", "1."]
    ),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | near_miss_text
    | st.sampled_from(["y" * 1024, "y" * 1025])
)
context_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(near_miss_text, inner, max_size=3),
    max_leaves=8,
)
contexts = st.one_of(
    st.dictionaries(near_miss_text, context_values, max_size=4),
    st.sampled_from([{f"k{i}": i for i in range(64)}, {f"k{i}": i for i in range(65)}, {"k" * 1025: 1}]),
    st.sampled_from([{"d": [[[["leaf"]]]]}, {"d": [[[[["leaf"]]]]]}, {"d": {"a": {"b": {"c": {"d": 1}}}}}]),
    scalars,
)
fields = near_miss_text | st.none() | st.integers() | st.booleans()
#: Ids the rule allows (its refused characters are all in these categories, or unassigned).
valid_ids = st.text(st.characters(exclude_categories=("Cc", "Cf", "Cs", "Cn", "Zl", "Zp")), min_size=1, max_size=8)
OPTIONAL_FIELDS = ["user_id", "experiment_id", "schema_version", "segment", "request_id", "context"]


@st.composite
def near_miss_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with up to three fields replaced by values on either side of their limits."""
    body: dict[str, Any] = {"user_id": draw(valid_ids), "experiment_id": draw(valid_ids)}
    for field in draw(st.lists(st.sampled_from(OPTIONAL_FIELDS), max_size=3, unique=True)):
        body[field] = draw(contexts if field == "context" else fields)
    if draw(st.integers(0, 9)) == 0:
        del body[draw(st.sampled_from(["user_id", "experiment_id"]))]
    return body


def _nested(kind: str, depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "array" else {"k": value}
    return value


EDGES = {
    "user_id 1024": {"user_id": "x" * 1024},
    "user_id 1025": {"user_id": "x" * 1025},
    "user_id emoji 1024": {"user_id": "🙂" * 1024},
    "segment 256": {"segment": "s" * 256},
    "segment 257": {"segment": "s" * 257},
    "schema_version 1.0": {"schema_version": "1.0"},
    "schema_version 1.0 newline": {"schema_version": "1.0\n"},
    "schema_version Arabic digit": {"schema_version": "1.\u0663"},
    "context 64 keys": {"context": {f"k{i}": i for i in range(64)}},
    "context 65 keys": {"context": {f"k{i}": i for i in range(65)}},
    "context value 1024": {"context": {"k": "v" * 1024}},
    "context value 1025": {"context": {"k": "v" * 1025}},
    "context nested value 1025": {"context": {"k": [{"j": "v" * 1025}]}},
    "context key 1024": {"context": {"k" * 1024: 1}},
    "context key 1025": {"context": {"k" * 1025: 1}},
    "context nested key 1025": {"context": {"k": {"k" * 1025: 1}}},
    **{
        f"context {kind}s {depth} deep": {"context": {"d": _nested(kind, depth)}}
        for kind in ("array", "object")
        for depth in (4, 5)
    },
}


LONE_SURROGATES = {
    "value": {"k": "\ud800"},
    "list item under an empty key": {"": ["\ud800"]},
    "nested value": {"k": {"j": "x\udfff"}},
    "key": {"\ud800": 1},
    "nested key": {"k": [{"\udc00": 1}]},
}


@pytest.mark.parametrize("context", list(LONE_SURROGATES.values()), ids=list(LONE_SURROGATES))
def test_lone_surrogates_in_context_are_refused_by_schema_and_worker(context):
    """A JSON ``\\ud800`` escape decodes to text with no UTF-8 encoding: the event could not be serialised.

    Found by the near-miss property test: the worker accepted it, then failed serialising the event
    (an unexpected error, abandoned until MaxDeliveryCountExceeded); now a precise SchemaValidationFailed.
    """
    body = {"user_id": "U1", "experiment_id": "exp_001", "context": context}
    assert worker_verdict(body) == "SchemaValidationFailed"
    assert not REQUEST_VALIDATOR.is_valid(body)


@pytest.mark.parametrize("fields", list(EDGES.values()), ids=list(EDGES))
def test_schema_and_worker_agree_at_every_limit(fields):
    """On both sides of each limit the schema and the worker give the same verdict."""
    body = {"user_id": "U1", "experiment_id": "exp_001", **fields}
    verdict = worker_verdict(body)
    assert REQUEST_VALIDATOR.is_valid(body) == (verdict == "accepted"), verdict


@settings(max_examples=400, deadline=None)
@given(near_miss_bodies())
@example({"user_id": "0", "experiment_id": "0", "context": {"": ["\ud800"]}})  # once found at random
def test_schema_and_worker_agree_on_near_miss_bodies(body):
    """For bodies on either side of every limit, the schema accepts exactly what the worker accepts."""
    verdict = worker_verdict(body)
    assert verdict in {"accepted", "SchemaValidationFailed"}
    assert REQUEST_VALIDATOR.is_valid(body) == (verdict == "accepted"), verdict


# -- cohort requests: the manual's example and the member limit ------------------------------------

COHORT_SCHEMA = json.loads((HERE / "cohort-request.schema.json").read_text(encoding="utf-8"))
COHORT_VALIDATOR = Draft202012Validator(COHORT_SCHEMA)
CLI_PAGE = (HERE.parent / "docs" / "cli.md").read_text(encoding="utf-8")


def cohort_verdict(body: dict[str, Any], max_body_bytes: int = MAX_BODY_BYTES) -> str:
    """``"accepted"`` or the dead-letter reason for a cohort body."""
    delivery = Delivery(
        body=json.dumps(body).encode(), message_id="c-1", enqueued_time=datetime(2026, 1, 1, tzinfo=UTC)
    )
    try:
        handle(delivery, ExperimentRegistry.from_configs([]), max_body_bytes=max_body_bytes)
    except PermanentError as error:
        return str(error.reason)
    return "accepted"


def cohort(arms: list[dict[str, Any]], members: int = 40) -> dict[str, Any]:
    """A cohort body of ``members`` members in two segments."""
    people = [{"member_id": f"C{i:06d}", "segment": "Standard" if i % 2 else "Premium"} for i in range(members)]
    return {"kind": "cohort", "experiment_id": "exp-7", "arms": arms, "members": people}


def test_cohort_arms_example_is_accepted():
    """The arms in the manual's cohort section (docs/cli.md) pass the schema and the worker."""
    example = re.search(r"`arms` \(`(\[.*?\])`", CLI_PAGE, re.DOTALL)
    assert example is not None, "docs/cli.md no longer shows an arms example"
    body = cohort(json.loads(example.group(1).replace("\n", " ")))
    assert COHORT_VALIDATOR.is_valid(body)
    assert cohort_verdict(body) == "accepted"


@pytest.mark.parametrize(
    ("arms", "valid"),
    [
        ([{"id": "control"}, {"id": "treatment"}], True),
        ([{"id": "control", "weight": 1}, {"id": "treatment", "weight": 2}], True),
        ([{"id": "control", "weight": None}, {"id": "treatment"}], True),
        ([{"id": "control"}, {"id": "treatment", "weight": 2}], False),
        ([{"id": "control", "weight": None}, {"id": "treatment", "weight": 2}], False),
    ],
)
def test_cohort_weights_on_every_arm_or_none_in_schema_and_worker(arms, valid):
    """A weight on one arm only is refused by the schema and dead-lettered as InvalidCohort."""
    body = cohort(arms)
    assert COHORT_VALIDATOR.is_valid(body) is valid
    assert cohort_verdict(body) == ("accepted" if valid else "InvalidCohort")


def test_cohort_member_and_body_limits_are_what_the_contract_says():
    """About 1,300 typical members fit the default 64 KiB body; 5,000 need a larger body limit,
    under which 5,001 members are CohortTooLarge (and fail the schema's maxItems)."""
    arms = [{"id": "control"}, {"id": "treatment"}]
    assert cohort_verdict(cohort(arms, 1_300)) == "accepted"
    assert cohort_verdict(cohort(arms, 1_400)) == "MessageTooLarge"
    assert cohort_verdict(cohort(arms, 5_000)) == "MessageTooLarge"
    assert cohort_verdict(cohort(arms, 5_000), max_body_bytes=256 * 1024) == "accepted"
    assert cohort_verdict(cohort(arms, 5_001), max_body_bytes=256 * 1024) == "CohortTooLarge"
    assert COHORT_VALIDATOR.is_valid(cohort(arms, 5_000))
    assert not COHORT_VALIDATOR.is_valid(cohort(arms, 5_001))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"segment": "vip", "request_id": "r-1", "context": {"campaign": "x"}, "variant_metadata": {"tone": "calm"}},
        {"hash_value": None, "threshold": None, "in_experiment": False, "reason": "coverage"},
        {"strategy": "stratified_random", "experiment_arm": "t1", "cohort_id": "c", "reason": "stratified"},
    ],
)
def test_a_row_built_from_an_event_is_the_validated_row(overrides):
    """from_event (built without validation, on the hot path) equals the validated model, byte for byte."""
    record = AssignmentRecord.from_event(_event(**overrides))
    validated = AssignmentRecord.model_validate(record.model_dump())
    assert record == validated
    assert record.model_dump_json() == validated.model_dump_json()
    assert record.model_fields_set == validated.model_fields_set == set(AssignmentRecord.model_fields)
    assert record.model_copy(update={"Reason": "x"}).Reason == "x"
    with pytest.raises(ValidationError):
        record.Reason = "changed"  # type: ignore[misc]  # frozen, like every row: the assignment must fail
