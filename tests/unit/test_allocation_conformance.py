"""The allocation algebra against ``schemas/allocation-cases.json`` (from the plain restatement)."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from schemas.instants import datetime_of_instant, parse_instant
from schemas.models import ExperimentFile
from tests import allocation_cases
from worker.domain.allocation import (
    AllocationFile,
    changes,
    compare_versions,
    compile_condition,
    compile_file,
    version_key,
)
from worker.domain.errors import ConfigurationError

ROOT = Path(__file__).parents[2]
DOCUMENT = json.loads((ROOT / "schemas" / "allocation-cases.json").read_text(encoding="utf-8"))
EXPERIMENTS_SCHEMA = json.loads((ROOT / "schemas" / "experiments.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(EXPERIMENTS_SCHEMA)


def _at(text: str) -> datetime:
    micros = parse_instant(text)
    assert micros is not None
    return datetime_of_instant(micros)


@functools.cache
def _compiled(name: str) -> AllocationFile:
    return compile_file(ExperimentFile.model_validate(DOCUMENT["configs"][name]["file"]), name)


def _compile(document: dict[str, Any]) -> AllocationFile:
    return compile_file(ExperimentFile.model_validate(document), "<case>")


def test_the_file_covers_every_reason_and_edge():
    """Every reason appears, and the boundaries the contract names are there."""
    reasons = {case["reason"] for case in DOCUMENT["cases"]}
    assert reasons == {
        "override", "draft", "stopped", "launched", "not_started", "ended", "targeting", "holdout", "layer",
        "coverage", "bucketed",
    }  # fmt: skip
    names = " | ".join(case["name"] for case in DOCUMENT["cases"])
    for edge in ("coverage 0 ", "coverage 1 ", "exactly at 0.25", "start_at is inclusive", "end_at is exclusive",
                 "override applies in draft", "when stopped", "when launched", "holdout and layer together",
                 "segment split with coverage", "default control"):  # fmt: skip
        assert edge in names
    layer_values = {case["hashes"]["layer"]["int"] for case in DOCUMENT["cases"] if "layer" in case["hashes"]}
    assert {299_999, 300_000, 599_999, 600_000} <= layer_values


@pytest.mark.parametrize(
    "case", DOCUMENT["cases"], ids=lambda c: f"{c['experiment_id']}:{c['user_id'][:12]}:{c['name'][:40]}"
)
def test_decision(case):
    """decide() gives the file's variant, in_experiment, reason, hash and threshold; explain() agrees."""
    experiment = _compiled(case["config"]).experiments[case["experiment_id"]]
    request = (case["user_id"], case["segment"], case["context"], _at(case["at"]))
    decision = experiment.decide(*request)
    assert decision.variant_id == case["variant_id"]
    assert decision.in_experiment is case["in_experiment"]
    assert decision.reason == case["reason"]
    assert decision.hash_value == case["hash_value"]
    assert decision.threshold == (None if case["threshold"] is None else tuple(case["threshold"]))
    explanation = experiment.explain(*request)
    assert explanation.decision == decision
    by_input = {spec["input"]: spec["value"] for spec in case["hashes"].values()}
    recorded = [step for step in explanation.steps if step.hash_input is not None]
    for step in recorded:
        assert by_input[step.hash_input] == step.hash_value
    if case["reason"] == "bucketed":
        assert case["hashes"]["variant"]["value"] == decision.hash_value


@pytest.mark.parametrize("name", sorted(DOCUMENT["configs"]))
def test_config_versions(name):
    """Every experiment's config_version is the file's (the reference's own JCS and SHA-256)."""
    compiled = _compiled(name)
    assert {e.experiment_id: e.config_version for e in compiled} == DOCUMENT["configs"][name]["config_versions"]


@pytest.mark.parametrize("name", sorted(DOCUMENT["configs"]))
def test_configs_are_schema_valid(name):
    """Every configuration of the file passes the published JSON Schema."""
    assert list(VALIDATOR.iter_errors(DOCUMENT["configs"][name]["file"])) == []


@pytest.mark.parametrize("case", DOCUMENT["conditions"], ids=lambda c: json.dumps(c["condition"])[:40])
def test_condition(case):
    """The compiled condition matches exactly where the reference does."""
    compiled, problems = compile_condition(case["condition"])
    assert problems == []
    assert compiled is not None
    assert compiled.matches(case["context"], case["segment"]) is case["matches"]


@pytest.mark.parametrize("case", DOCUMENT["invalid_conditions"], ids=lambda c: json.dumps(c["condition"])[:40])
def test_invalid_condition(case):
    """Refused at load with a problem at exactly the listed paths; the schema refuses it too where it can."""
    compiled, problems = compile_condition(case["condition"])
    assert compiled is None
    assert sorted(problem.path for problem in problems) == sorted(case["problems"])
    document = {"experiments": [{"id": "e", "split": {"A": 1.0}, "targeting": case["condition"]}]}
    assert (list(VALIDATOR.iter_errors(document)) != []) is case["schema_refuses"]


def test_version_order():
    """Every ordered pair of the chain compares as the reference says."""
    for pair in DOCUMENT["versions"]["order"]:
        assert compare_versions(pair["left"], pair["right"]) == pair["order"], pair


@pytest.mark.parametrize("text", DOCUMENT["versions"]["invalid"])
def test_invalid_version(text):
    """Not versions: no key, and the schema's pattern refuses them as operands."""
    assert version_key(text) is None
    document = {"experiments": [{"id": "e", "split": {"A": 1.0}, "targeting": {"v": {"$veq": text}}}]}
    assert list(VALIDATOR.iter_errors(document)) != []


@pytest.mark.parametrize("case", DOCUMENT["times"], ids=lambda c: repr(c["text"]))
def test_time(case):
    """The instant of each string, or None when it is not a time."""
    assert parse_instant(case["text"]) == case["micros"]


@pytest.mark.parametrize("case", DOCUMENT["invalid_configs"], ids=lambda c: c["name"])
def test_invalid_config(case):
    """The whole file is refused with exactly the listed problems, each naming its experiment and field."""
    parsed = ExperimentFile.model_validate(case["file"])
    with pytest.raises(ConfigurationError) as raised:
        compile_file(parsed, "f.yaml")
    lines = str(raised.value).splitlines()
    assert len(lines) == len(case["problems"]), lines
    for kind, ident, field in case["problems"]:
        where = f"f.yaml: {kind} {ident!r}: " + ("duplicate id" if field is None else f"field '{field}': ")
        assert any(line.startswith(where) for line in lines), (where, lines)


@pytest.mark.parametrize("case", DOCUMENT["invalid_models"], ids=lambda c: c["name"])
def test_invalid_model(case):
    """Refused by the models at the listed field (and by the schema, where JSON Schema can say it)."""
    with pytest.raises(ValidationError) as raised:
        ExperimentFile.model_validate(case["file"])
    paths = [".".join(map(str, error["loc"])) for error in raised.value.errors()]
    assert case["field"] in paths
    if "range empty" not in case["name"] and "reversed" not in case["name"]:
        assert list(VALIDATOR.iter_errors(case["file"])) != []


@pytest.mark.parametrize("case", DOCUMENT["edits"], ids=lambda c: c["name"])
def test_edit(case):
    """A reload is refused for exactly the listed experiments."""
    report = changes(_compile(case["old"]), _compile(case["new"]), at=datetime(2026, 12, 7, tzinfo=UTC), sample=500)
    assert {change.experiment_id: change.refused for change in report.experiments} == case["refused"]


def test_the_file_is_what_the_reference_generates():
    """schemas/allocation-cases.json is fresh: run python -m tests.allocation_cases (make schemas)."""
    assert json.loads(json.dumps(allocation_cases.build(), ensure_ascii=False)) == DOCUMENT
