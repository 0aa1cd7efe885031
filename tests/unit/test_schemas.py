"""The wire contract: tolerant reading of requests, strict known fields, limits, fresh JSON Schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas import AssignmentEvent, AssignmentRecord, AssignmentRequest
from schemas.generate import HERE, SCHEMA_FILES, render


def test_minimal_request():
    """user_id and experiment_id are enough; the rest defaults."""
    request = AssignmentRequest.model_validate({"user_id": "U1", "experiment_id": "exp_001"})
    assert request.schema_version == "1.0"
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


def _event(**overrides):
    fields = {
        "event_id": "id",
        "correlation_id": "c",
        "variant_id": "A",
        "hash_value": 0.25,
        "threshold": (0.0, 0.5),
        "experiment_id": "e",
        "experiment_version": "1",
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
    assert committed == render(SCHEMA_FILES[name]), f"schemas/{name} is stale: run python -m schemas.generate"


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
