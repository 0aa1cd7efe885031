"""The registry compiles every experiment through the allocation algebra; ``assign``/``explain`` are its public API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.instants import datetime_of_instant, parse_instant
from worker import ABAssignmentAgent, ExperimentRegistry
from worker.domain.errors import ConfigurationError, UnknownExperimentError

ROOT = Path(__file__).parents[2]
CASES = json.loads((ROOT / "schemas" / "allocation-cases.json").read_text(encoding="utf-8"))
REGISTRIES = {name: ExperimentRegistry.from_dict(spec["file"], name) for name, spec in CASES["configs"].items()}


def _at(text: str) -> datetime:
    micros = parse_instant(text)
    assert micros is not None
    return datetime_of_instant(micros)


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: f"{c['experiment_id']}:{c['name'][:48]}")
def test_assign_gives_every_conformance_answer(case: dict[str, Any]) -> None:
    """``ExperimentRegistry.assign`` reproduces every decision of ``schemas/allocation-cases.json``."""
    registry = REGISTRIES[case["config"]]
    got = registry.assign(
        case["experiment_id"], case["user_id"], segment=case["segment"], context=case["context"], at=_at(case["at"])
    )
    expected = (case["variant_id"], case["in_experiment"], case["reason"])
    assert (got.variant_id, got.in_experiment, got.reason) == expected
    assert got.hash_value == case["hash_value"]
    assert got.threshold == (None if case["threshold"] is None else tuple(case["threshold"]))
    expected_version = CASES["configs"][case["config"]]["config_versions"][case["experiment_id"]]
    assert got.config_version == expected_version


def test_explain_is_the_same_walk_recorded() -> None:
    """``explain`` decides what ``assign`` decides, and lists every step in order."""
    registry = REGISTRIES["issue"]
    for case in (c for c in CASES["cases"] if c["config"] == "issue"):
        request = {"segment": case["segment"], "context": case["context"], "at": _at(case["at"])}
        explanation = registry.explain(case["experiment_id"], case["user_id"], **request)
        assigned = registry.assign(case["experiment_id"], case["user_id"], **request)
        assert explanation.decision.variant_id == assigned.variant_id
        assert explanation.decision.reason == assigned.reason
        assert [s.step for s in explanation.steps][-1] == "bucket"


def test_plain_experiments_assign_exactly_as_the_agent() -> None:
    """Without the new fields, ``assign`` is the seed rule: variant, hash_value and threshold of ``assign_user``."""
    registry = ExperimentRegistry.load(ROOT / "deploy" / "experiments.yaml")
    agent = ABAssignmentAgent({"A": 0.5, "B": 0.5})
    for index in range(2000):
        user = f"U{index}"
        got = registry.assign("exp_001", user)
        expected = agent.assign_user(user, "exp_001")
        assert (got.variant_id, got.hash_value, got.threshold) == (
            expected["variant_id"],
            expected["hash_value"],
            expected["threshold"],
        )
        assert (got.in_experiment, got.reason) == (True, "bucketed")
    assert registry.assign("exp_001", "U123").variant_id == "A"


def test_segment_comes_from_the_context_when_not_given() -> None:
    """The effective segment rule of requests: ``segment``, else ``context["segment"]``."""
    registry = ExperimentRegistry.load(ROOT / "deploy" / "experiments.yaml")
    by_context = registry.assign("exp_personalization_001", "U1", context={"segment": "high_intent"})
    by_field = registry.assign("exp_personalization_001", "U1", segment="high_intent")
    assert by_context.segment == by_field.segment == "high_intent"
    assert by_context.threshold == by_field.threshold


def test_unknown_experiment_lists_what_is_configured() -> None:
    """An unknown experiment is a clear error naming the configured ones."""
    registry = ExperimentRegistry.load(ROOT / "deploy" / "experiments.yaml")
    with pytest.raises(UnknownExperimentError) as caught:
        registry.assign("exp_typo", "U1")
    message = str(caught.value)
    assert "'exp_typo' is not configured" in message
    assert "'exp_001'" in message
    assert "'exp_personalization_001'" in message
    with pytest.raises(LookupError):
        registry.explain("exp_typo", "U1")


def test_at_none_is_now_in_utc() -> None:
    """``at=None`` decides now: a window that ended yesterday is ended, one from tomorrow not started."""
    now = datetime.now(UTC)
    document = {
        "experiments": [
            {"id": "past", "split": {"A": 1.0}, "end_at": (now - timedelta(days=1)).isoformat()},
            {"id": "future", "split": {"A": 1.0}, "start_at": (now + timedelta(days=1)).isoformat()},
            {"id": "now", "split": {"A": 1.0}, "start_at": (now - timedelta(days=1)).isoformat()},
        ]
    }
    registry = ExperimentRegistry.from_dict(document)
    assert registry.assign("past", "U1").reason == "ended"
    assert registry.assign("future", "U1").reason == "not_started"
    live = registry.assign("now", "U1")
    assert live.reason == "bucketed"
    assert live.at.tzinfo is not None
    assert abs((live.at - now).total_seconds()) < 600
    assert registry.assign("future", "U1", at=now + timedelta(days=2)).reason == "bucketed"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"user_id": ""}, "user_id is empty"),
        ({"user_id": "a\u202eb"}, "user_id"),
        ({"segment": ""}, "segment is empty"),
        ({"context": ["not", "an", "object"]}, "context must be a mapping"),
        ({"at": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(call: dict[str, Any], message: str) -> None:
    """Ids, segments and contexts the wire contract refuses, and a naive time, raise ValueError saying which."""
    registry = ExperimentRegistry.load(ROOT / "deploy" / "experiments.yaml")
    arguments: dict[str, Any] = {"user_id": "U1"} | call
    user = arguments.pop("user_id")
    with pytest.raises(ValueError, match=message):
        registry.assign("exp_001", user, **arguments)


def test_the_allocation_fields_are_applied_not_ignored() -> None:
    """A file's allocation fields decide: coverage 0 serves control, an override its variant, a stopped test control."""
    registry = ExperimentRegistry.from_dict(
        {
            "experiments": [
                {"id": "ramp", "split": {"control": 0.5, "blue": 0.5}, "coverage": 0.0},
                {"id": "qa", "split": {"control": 0.5, "blue": 0.5}, "overrides": {"tester": "blue"}},
                {"id": "done", "split": {"control": 0.5, "blue": 0.5}, "status": "stopped"},
            ]
        }
    )
    ramp = registry.assign("ramp", "U1")
    assert (ramp.variant_id, ramp.in_experiment, ramp.reason, ramp.hash_value, ramp.threshold) == (
        "control",
        False,
        "coverage",
        None,
        None,
    )
    tester = registry.assign("qa", "tester")
    assert (tester.variant_id, tester.in_experiment, tester.reason) == ("blue", False, "override")
    assert {registry.assign("done", f"U{i}").variant_id for i in range(50)} == {"control"}


@pytest.mark.parametrize("case", CASES["invalid_configs"], ids=lambda c: c["name"])
def test_every_invalid_file_of_the_contract_is_refused_naming_each_problem(case: dict[str, Any]) -> None:
    """Whole-file problems (overlaps, unknown layers, launched, control, overrides…) refuse the file, each named."""
    with pytest.raises(ConfigurationError) as caught:
        ExperimentRegistry.from_dict(case["file"], "exp.yaml")
    lines = str(caught.value).splitlines()
    for kind, name, field in case["problems"]:
        assert any(
            f"exp.yaml: {kind} {name!r}" in line and (field is None or f"'{field}'" in line) for line in lines
        ), (kind, name, field, lines)


def test_layers_and_holdouts_field_errors_are_named_by_their_id() -> None:
    """A layer or holdout with a bad field is named by its id, and experiments naming it are not also 'unknown'."""
    document = {
        "layers": [{"id": "checkout", "colour": "red"}],
        "holdouts": [{"id": "q1", "share": 1.5}],
        "experiments": [
            {"id": "a", "split": {"A": 1.0}, "layer": {"id": "checkout", "range": [0, 0.5]}, "holdouts": ["q1"]},
        ],
    }
    with pytest.raises(ConfigurationError) as caught:
        ExperimentRegistry.from_dict(document, "exp.yaml")
    lines = str(caught.value).splitlines()
    assert any(line.startswith("exp.yaml: layer 'checkout': field 'colour'") for line in lines), lines
    assert any(line.startswith("exp.yaml: holdout 'q1': field 'share'") for line in lines), lines
    assert not any("unknown layer" in line or "unknown holdout" in line for line in lines), lines
