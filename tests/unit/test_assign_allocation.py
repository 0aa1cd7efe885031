"""``ab-worker assign --input`` decides every row as the worker decides its request, with in_experiment and reason."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.cli_runs import experiments_file, run_cli
from worker import ABAssignmentAgent, ExperimentRegistry
from worker.cli.common import ExitStatus
from worker.service.batch import OUTPUT_FIELDS, assign_file, csv_value

REPO = Path(__file__).parents[2]
AT = "2026-12-07T12:00:00Z"
WHEN = datetime(2026, 12, 7, 12, tzinfo=UTC)

FILE = {
    "holdouts": [{"id": "q1", "share": 0.1}],
    "experiments": [
        {
            "id": "exp_target",
            "split": {"control": 0.5, "blue": 0.5},
            "holdouts": ["q1"],
            "coverage": 0.9,
            "targeting": {
                "app_version": {"$vgte": "5.2"},
                "age": {"$gte": 18},
                "zip": {"$in": ["02139", "10001"]},
                "beta": True,
            },
            "overrides": {"007": "blue"},
            "segments": {"vip": {"control": 0.2, "blue": 0.8}},
        },
        {"id": "exp_ended", "split": {"A": 0.5, "B": 0.5}, "end_at": "2026-12-07T12:00:00Z"},
    ],
}


@pytest.fixture
def config(tmp_path: Path) -> str:
    """The experiments file above, as YAML."""
    return experiments_file(tmp_path, FILE)


def _assign(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "assign", *argv)


def test_json_lines_rows_are_what_the_registry_decides(config: str, tmp_path: Path, capsys) -> None:
    """Each row's variant, in_experiment, reason and hash equal ``ExperimentRegistry.assign`` for its context."""
    contexts = [
        {"app_version": "5.3", "age": 30, "zip": "02139", "beta": True},
        {"app_version": "5.1", "age": 30, "zip": "02139", "beta": True},
        {"app_version": "5.2.0", "age": 17, "zip": "10001", "beta": True, "segment": "vip"},
        None,
    ]
    rows: list[dict[str, Any]] = [
        {"user_id": f"U{i}", **({"context": contexts[i % 4]} if contexts[i % 4] else {})}
        | ({"segment": "vip"} if i % 5 == 0 else {})
        for i in range(400)
    ]
    rows.append({"user_id": "007", "context": contexts[0]})
    source = tmp_path / "users.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    status, out, err = _assign(
        capsys, "--experiment", "exp_target", "--config", config, "--input", str(source), "--at", AT
    )
    assert status == ExitStatus.OK, err
    registry = ExperimentRegistry.load(config)
    written = [json.loads(line) for line in out.splitlines()]
    assert len(written) == len(rows)
    for row, result in zip(rows, written, strict=True):
        expected = registry.assign(
            "exp_target", row["user_id"], segment=row.get("segment"), context=row.get("context"), at=WHEN
        )
        assert list(result) == list(OUTPUT_FIELDS)
        got = (result["variant_id"], result["in_experiment"], result["reason"], result["hash_value"], result["segment"])
        assert got == (
            expected.variant_id,
            expected.in_experiment,
            expected.reason,
            expected.hash_value,
            expected.segment or "",
        )
    reasons = {result["reason"] for result in written}
    assert reasons == {"override", "targeting", "holdout", "coverage", "bucketed"}
    assert f"every row decided at {AT} (--at, one time for the file)" in err


def test_the_decision_time_is_one_for_the_file(config: str, tmp_path: Path, capsys) -> None:
    """--at before end_at buckets every row; at end_at every row has ended; the summary names the time."""
    source = tmp_path / "users.csv"
    source.write_text("user_id\n" + "".join(f"U{i}\n" for i in range(50)), encoding="utf-8")
    base = ("--experiment", "exp_ended", "--config", config, "--input", str(source), "--output-format", "csv")
    status, out, err = _assign(capsys, *base, "--at", "2026-12-07T11:59:59.999999Z")
    assert status == ExitStatus.OK
    assert {row["reason"] for row in csv.DictReader(io.StringIO(out))} == {"bucketed"}
    status, out, err = _assign(capsys, *base, "--at", AT)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {(row["variant_id"], row["in_experiment"], row["reason"], row["hash_value"]) for row in rows} == {
        ("A", "false", "ended", "")
    }
    assert "in the experiment: 0; outside it: ended 50" in err
    status, out, err = _assign(capsys, *base[:-2])
    assert "(the start of the run, one time for the file)" in err


def test_csv_context_columns_take_the_kinds_the_targeting_compares(config: str, tmp_path: Path, capsys) -> None:
    """age compared with a number reads 30 as a number; 5.3 stays a version and 02139 a zip; ids are never converted."""
    source = tmp_path / "users.csv"
    source.write_text(
        "user_id,segment,app_version,age,zip,beta,email\n"
        "U1,,5.3,30,02139,true,a@b.c\n"  # every condition holds
        "U2,,5.3,30,2139,true,\n"  # 2139 is not the zip 02139
        "U3,,5.3,thirty,02139,true,\n"  # thirty is text: no number to compare
        "U4,,5.3,30,02139,True,\n"  # True is not JSON's true
        "007,,5.3,30,02139,true,\n",  # an override, by the id as written
        encoding="utf-8",
    )
    status, out, err = _assign(
        capsys, "--experiment", "exp_target", "--config", config, "--input", str(source), "--at", AT,
        "--output-format", "csv",
    )  # fmt: skip
    assert status == ExitStatus.OK, err
    rows = {row["user_id"]: row for row in csv.DictReader(io.StringIO(out))}
    assert [rows[user]["reason"] for user in ("U2", "U3", "U4")] == ["targeting"] * 3
    assert rows["U1"]["reason"] != "targeting"
    assert (rows["007"]["variant_id"], rows["007"]["reason"]) == ("blue", "override")
    registry = ExperimentRegistry.load(config)
    context = {"app_version": "5.3", "age": 30, "zip": "02139", "beta": True, "email": "a@b.c"}
    assert rows["U1"]["reason"] == registry.assign("exp_target", "U1", context=context, at=WHEN).reason


@pytest.mark.parametrize(
    ("cell", "kinds", "value"),
    [
        ("30", {"number"}, 30),
        ("-2.5", {"number"}, -2.5),
        ("1e3", {"number"}, 1000.0),
        ("018", {"number"}, "018"),
        ("1,000", {"number"}, "1,000"),
        ("+5", {"number"}, "+5"),
        ("NaN", {"number"}, "NaN"),
        ("5.3", {"string"}, "5.3"),
        ("5.3", set(), "5.3"),
        ("12345", {"string"}, "12345"),
        ("true", {"boolean"}, True),
        ("false", {"boolean"}, False),
        ("True", {"boolean"}, "True"),
        ("true", {"string"}, "true"),
        ("7", {"number", "string"}, 7),
    ],
)
def test_csv_value_reads_the_kind_the_targeting_compares(cell: str, kinds: set[str], value: object) -> None:
    """A cell is a number or a boolean only where the targeting compares one, and only in JSON's spelling."""
    got = csv_value(cell, frozenset(kinds))
    assert got == value
    assert type(got) is type(value)


def test_a_plain_experiment_keeps_the_seed_rule_with_in_experiment_and_reason(tmp_path: Path, capsys) -> None:
    """Without allocation fields every row is bucketed: the seed rule's variant and hash, in_experiment true."""
    source = tmp_path / "users.csv"
    source.write_text("user_id,country\n" + "".join(f"U{i},US\n" for i in range(300)), encoding="utf-8")
    config = str(REPO / "deploy" / "experiments.yaml")
    status, out, _ = _assign(
        capsys, "--experiment", "exp_001", "--config", config, "--input", str(source), "--output-format", "csv"
    )
    assert status == ExitStatus.OK
    agent = ABAssignmentAgent({"A": 0.5, "B": 0.5})
    for row in csv.DictReader(io.StringIO(out)):
        expected = agent.assign_user(row["user_id"], "exp_001")
        assert (row["variant_id"], float(row["hash_value"])) == (expected["variant_id"], expected["hash_value"])
        assert (row["in_experiment"], row["reason"]) == ("true", "bucketed")


def test_bad_contexts_are_skipped_rows_naming_the_line(config: str, tmp_path: Path, capsys) -> None:
    """A context that is not an object, or breaks a request's limits, is skipped as the worker would refuse it."""
    source = tmp_path / "users.jsonl"
    source.write_text(
        '{"user_id": "U1", "context": "US"}\n'
        '{"user_id": "U2", "context": {"age": 30}}\n'
        + json.dumps({"user_id": "U3", "context": {"note": "x" * 1025}})
        + "\n"
        + json.dumps({"user_id": "U4", "context": {f"k{i}": i for i in range(65)}})
        + "\n",
        encoding="utf-8",
    )
    status, out, err = _assign(capsys, "--experiment", "exp_target", "--config", config, "--input", str(source))
    assert status == ExitStatus.PARTIAL
    assert [json.loads(line)["user_id"] for line in out.splitlines()] == ["U2"]
    assert f"{source}: line 1: skipped: context must be a JSON object, got a string" in err
    assert f"{source}: line 3: skipped: context holds a 1025-character string; the limit is 1024" in err
    assert f"{source}: line 4: skipped: context has 65 keys; the limit is 64" in err


def test_a_csv_naming_a_context_column_twice_is_refused(config: str, tmp_path: Path, capsys) -> None:
    """Two columns of one name cannot say which is the attribute: the file is refused before any row."""
    source = tmp_path / "users.csv"
    source.write_text("user_id,age,age\nU1,30,31\n", encoding="utf-8")
    status, out, err = _assign(capsys, "--experiment", "exp_target", "--config", config, "--input", str(source))
    assert status == ExitStatus.USAGE
    assert out == ""
    assert "line 1: column 'age' appears more than once in the header" in err


def test_context_is_for_one_user(config: str, tmp_path: Path, capsys) -> None:
    """--context with --input is refused: each row carries its own."""
    source = tmp_path / "users.csv"
    source.write_text("user_id\nU1\n", encoding="utf-8")
    status, _, err = _assign(
        capsys, "--experiment", "exp_target", "--config", config, "--input", str(source), "--context", "{}"
    )
    assert status == ExitStatus.USAGE
    assert "--context is for one --user; with --input each row's context is used" in err


def test_assign_file_refuses_a_naive_time() -> None:
    """The decision time of a file is an instant: a naive datetime is a programming error."""
    experiment = ExperimentRegistry.single("e", {"A": 0.5, "B": 0.5}).experiment("e")
    with pytest.raises(ValueError, match="timezone-aware"):
        assign_file(
            iter([]),
            io.StringIO(),
            experiment,
            in_format="jsonl",
            out_format="jsonl",
            source="m",
            at=datetime(2026, 1, 1),
        )


@pytest.mark.parametrize(
    "context",
    [
        {"a": "x" * 1024, "b": 1, "c": None, "d": True},
        {"a": "x" * 1025},
        {"k" * 1025: 1},
        {"a": "ok\ud800"},
        {"\udfff": "ok"},
        {"a": [1, "y" * 1025]},
        {"a": {"b": {"c": {"d": {"e": 1}}}}},
        {"a": 1.5, "b": "fine"},
    ],
)
def test_the_flat_context_shortcut_agrees_with_the_full_walk(context: dict[str, object]) -> None:
    """request_context_problem's one-pass check of flat contexts finds what context_problem finds."""
    from schemas.models import context_problem, request_context_problem

    assert request_context_problem(context) == context_problem(context)  # type: ignore[arg-type]


def test_one_user_is_decided_as_the_worker_decides_a_request_with_that_context_and_time(config: str, capsys) -> None:
    """assign --user --context --at prints the event the worker would publish: in_experiment, reason, assigned_at."""
    registry = ExperimentRegistry.load(config)
    context = {"app_version": "5.3", "age": 30, "zip": "02139", "beta": True}
    for user in ("007", "U1", "U2", "U3"):
        status, out, err = _assign(
            capsys, "--experiment", "exp_target", "--config", config, "--user", user, "--context", json.dumps(context),
            "--at", "2026-12-07T13:00:00+01:00",
        )  # fmt: skip
        assert status == ExitStatus.OK, err
        event = json.loads(out)
        expected = registry.assign("exp_target", user, context=context, at=WHEN)
        assert (event["variant_id"], event["in_experiment"], event["reason"], event["hash_value"]) == (
            expected.variant_id,
            expected.in_experiment,
            expected.reason,
            expected.hash_value,
        )
        assert event["config_version"] == expected.config_version
        assert datetime.fromisoformat(event["assigned_at"]) == WHEN
        assert event["context"] == {}  # the allow-list is empty: targeting read it, nothing leaves
    status, out, _ = _assign(capsys, "--experiment", "exp_ended", "--config", config, "--user", "U1", "--at", AT)
    assert (json.loads(out)["reason"], json.loads(out)["in_experiment"]) == ("ended", False)
