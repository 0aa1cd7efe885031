"""A cohort honours its experiment's overrides, lifecycle, targeting, holdouts and layer: ``stratify --config``."""

from __future__ import annotations

import csv
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker import ExperimentRegistry
from worker.cli import main
from worker.cli.common import ExitStatus
from worker.domain.cohort.allocation import partition
from worker.domain.cohort.stratify import stratify_columns

DATA = Path(__file__).resolve().parents[1] / "data" / "cohort_250.csv"
ARMS = "control,treatment_1,treatment_2,treatment_3"
MOMENT = "2025-11-23T09:00:00Z"
AT = datetime(2025, 11, 23, 9, tzinfo=UTC)
SPLIT = {"control": 0.25, "treatment_1": 0.25, "treatment_2": 0.25, "treatment_3": 0.25}
OVERRIDDEN = {"CUST-0001": "treatment_2", "CUST-0002": "control", "CUST-0003": "treatment_1"}


def _file(**experiment: Any) -> dict[str, Any]:
    return {
        "layers": [{"id": "email"}],
        "holdouts": [{"id": "q4", "share": 0.1}],
        "experiments": [{"id": "email-tone-2025", "split": SPLIT, **experiment}],
    }


FULL = _file(
    holdouts=["q4"],
    layer={"id": "email", "range": [0.0, 0.8]},
    coverage=0.3,
    overrides=OVERRIDDEN,
    targeting={"age": {"$gte": 18}},
)


def _config(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def _cohort_with_ages(tmp_path: Path) -> Path:
    """The 250-customer file with an age column: every sixth member a minor."""
    rows = list(csv.reader(DATA.read_text(encoding="utf-8").splitlines()))
    lines = ["customer_id,segment,age"] + [
        f"{member},{segment},{16 if index % 6 == 0 else 30}" for index, (member, segment) in enumerate(rows[1:])
    ]
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _stratify(tmp_path: Path, source: Path, *extra: str, out: str = "out.csv", report: str = "report.json") -> int:
    return main(
        [
            "stratify", str(source), "--experiment", "email-tone-2025", "--arms", ARMS, "--assigned-at", MOMENT,
            "--out", str(tmp_path / out), "--report", str(tmp_path / report), "--min-per-cell", "1", *extra,
        ]
    )  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


def test_no_stratified_member_is_one_live_traffic_excludes(tmp_path: Path, capsys) -> None:
    """Each stratified member would be bucketed (or ramped: coverage is no cohort's); every other keeps its decision."""
    config = _config(tmp_path, FULL)
    source = _cohort_with_ages(tmp_path)
    assert _stratify(tmp_path, source, "--config", str(config)) == ExitStatus.OK
    registry = ExperimentRegistry.load(config)
    rows = _rows(tmp_path / "out.csv")
    assert len(rows) == 250
    ages = {row["customer_id"]: int(row["age"]) for row in _rows(source)}
    stratified = [row for row in rows if row["assignment_method"] == "stratified_random"]
    decided = [row for row in rows if row["assignment_method"] != "stratified_random"]
    assert stratified
    assert {row["assignment_method"] for row in decided} == {"override", "targeting", "holdout", "layer"}
    for row in rows:
        live = registry.assign(
            "email-tone-2025",
            row["customer_id"],
            segment=row["segment"],
            context={"age": ages[row["customer_id"]]},
            at=AT,
        )
        if row["assignment_method"] == "stratified_random":
            assert live.reason in {"bucketed", "coverage"}, row
            assert row["experiment_arm"] in ARMS.split(",")
        else:
            assert (row["variant_id"], row["assignment_method"], row["experiment_arm"]) == (
                live.variant_id,
                live.reason,
                "",
            )
    assert {row["customer_id"]: row["variant_id"] for row in decided if row["customer_id"] in OVERRIDDEN} == OVERRIDDEN
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    section = report["allocation"]
    assert section["stratified"] == len(stratified) == report["members"]
    listed = {member for members in section["members"].values() for member in members}
    assert listed == {row["customer_id"] for row in decided}
    assert section["counts"] == {reason: len(ids) for reason, ids in section["members"].items()}
    assert list(section["counts"]) == ["override", "targeting", "holdout", "layer"]
    assert section["steps_left_out"] == ["coverage"]
    out = capsys.readouterr().out
    assert f"{len(decided)} of 250 members decided before stratification" in out


def test_the_others_are_stratified_by_the_same_algorithm(tmp_path: Path) -> None:
    """The stratified rows are exactly what stratifying the remaining members alone gives."""
    config = _config(tmp_path, FULL)
    source = _cohort_with_ages(tmp_path)
    assert _stratify(tmp_path, source, "--config", str(config)) == ExitStatus.OK
    members = _rows(source)
    ids, segments = [m["customer_id"] for m in members], [m["segment"] for m in members]
    experiment = ExperimentRegistry.load(config).experiment("email-tone-2025").allocation
    split = partition(experiment, ids, segments, [{"age": int(m["age"])} for m in members], AT)
    alone = stratify_columns(
        split.pick(ids), split.pick(segments), ARMS.split(","), experiment_id="email-tone-2025", assigned_at=AT
    )
    written = [tuple(row.values()) for row in _rows(tmp_path / "out.csv")][: len(split.stratified)]
    assert written == list(alone.records.rows())


@pytest.mark.parametrize(
    ("experiment", "reason"),
    [
        ({"start_at": "2025-12-01T00:00:00Z"}, "not_started 250"),
        ({"end_at": "2025-11-23T09:00:00Z"}, "ended 250"),
        ({"status": "stopped"}, "stopped 250"),
        ({"status": "draft", "overrides": OVERRIDDEN}, "override 3, draft 247"),
    ],
)
def test_a_cohort_outside_its_lifecycle_is_refused(
    tmp_path: Path, capsys, experiment: dict[str, Any], reason: str
) -> None:
    """Before start_at, at end_at, stopped or draft, no member can be stratified: one error, nothing written."""
    config = _config(tmp_path, _file(**experiment))
    assert _stratify(tmp_path, DATA, "--config", str(config)) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert f"nothing to stratify: the allocation of email-tone-2025 in {config} decides every member" in err
    assert f"({reason})" in err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(
    "document",
    [
        _file(),  # the seed rule alone
        _file(holdouts=["q4"], layer={"id": "email", "range": [0.0, 1.0]}, coverage=0.1),  # no member decided
    ],
    ids=["plain", "nobody-decided"],
)
def test_a_cohort_no_step_decides_is_written_byte_for_byte_as_before(tmp_path: Path, document: dict[str, Any]) -> None:
    """When no member is decided by a step, the assignments are the bytes a run without --config writes."""
    if document["experiments"][0].get("holdouts"):
        document = {**document, "holdouts": [{"id": "q4", "share": 0.0}]}
    config = _config(tmp_path, document)
    for fmt in ("csv", "jsonl"):
        assert _stratify(tmp_path, DATA, out=f"before.{fmt}", report="before.json") == ExitStatus.OK
        assert _stratify(tmp_path, DATA, "--config", str(config), out=f"after.{fmt}", report="after.json") == 0
        assert (tmp_path / f"after.{fmt}").read_bytes() == (tmp_path / f"before.{fmt}").read_bytes()
    before = json.loads((tmp_path / "before.json").read_text(encoding="utf-8"))
    after = json.loads((tmp_path / "after.json").read_text(encoding="utf-8"))
    section = after.pop("allocation", None)
    assert after == before
    assert section is None or (section["decided"], section["members"]) == (0, {})


def test_json_lines_members_carry_a_context_object(tmp_path: Path) -> None:
    """A JSON-lines cohort gives each member's context as a ``context`` object, read as assign --input reads it."""
    config = _config(tmp_path, _file(targeting={"plan": "pro"}))
    rng = random.Random(7)
    lines = [
        json.dumps(
            {"customer_id": f"C{i}", "segment": rng.choice("ab"), "context": {"plan": "pro" if i % 3 else "free"}}
        )
        for i in range(120)
    ]
    source = tmp_path / "cohort.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _stratify(tmp_path, source, "--config", str(config), out="out.jsonl") == 0
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    targeted = {row["customer_id"] for row in written if row["assignment_method"] == "targeting"}
    assert targeted == {f"C{i}" for i in range(120) if i % 3 == 0}
    assert all(
        row["variant_id"] == "control" and row["experiment_arm"] == ""
        for row in written
        if row["customer_id"] in targeted
    )


def test_the_environment_names_the_file_and_an_unknown_experiment_is_noted(tmp_path: Path, capsys, monkeypatch) -> None:
    """AB_WORKER_EXPERIMENTS_FILE applies like --config; a cohort label not configured there is stratified as before."""
    config = _config(tmp_path, FULL)
    source = _cohort_with_ages(tmp_path)
    monkeypatch.setenv("AB_WORKER_EXPERIMENTS_FILE", str(config))
    assert _stratify(tmp_path, source) == ExitStatus.OK
    assert "decided before stratification" in capsys.readouterr().out
    document = FULL | {"experiments": [FULL["experiments"][0] | {"id": "another"}]}
    monkeypatch.setenv("AB_WORKER_EXPERIMENTS_FILE", str(_config(tmp_path, document)))
    assert _stratify(tmp_path, source) == ExitStatus.OK
    captured = capsys.readouterr()
    assert "note: 'email-tone-2025' is not in" in captured.err
    assert {row["assignment_method"] for row in _rows(tmp_path / "out.csv")} == {"stratified_random"}
    assert _stratify(tmp_path, source, "--config", str(tmp_path / "experiments.yaml")) == ExitStatus.USAGE
    assert "--config: experiment 'email-tone-2025' is not in" in capsys.readouterr().err


def test_a_bad_member_context_is_an_input_problem(tmp_path: Path, capsys) -> None:
    """A context breaking the request limits is a problem naming file and line; nothing is written."""
    config = _config(tmp_path, _file(targeting={"plan": "pro"}))
    source = tmp_path / "cohort.jsonl"
    source.write_text(
        '{"customer_id": "C1", "segment": "a", "context": {"plan": "pro"}}\n'
        '{"customer_id": "C2", "segment": "a", "context": ["pro"]}\n',
        encoding="utf-8",
    )
    assert _stratify(tmp_path, source, "--config", str(config), out="out.jsonl") == ExitStatus.USAGE
    assert f"{source}:2: context must be a JSON object, got an array" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
