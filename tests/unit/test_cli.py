"""The command line: assign, run and validate-config, including their errors and exit statuses."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import main

REPO = Path(__file__).parents[2]
CONFIG = str(REPO / "deploy" / "experiments.yaml")


def test_assign_single_user_prints_event(capsys):
    """assign --user prints the event JSON with the known answer."""
    assert main(["assign", "--experiment", "exp_001", "--user", "U123"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert event["variant_id"] == "A"
    assert event["hash_value"] == 0.002099
    assert event["seed"] == "echovoice"


def test_assign_with_split_and_seed(capsys):
    """--split and --seed change the rule as documented."""
    assert main(["assign", "--experiment", "exp_001", "--user", "U456", "--split", "A=0.7,B=0.3"]) == 0
    assert json.loads(capsys.readouterr().out)["variant_id"] == "A"
    assert main(["assign", "--experiment", "exp_001", "--user", "U123", "--seed", "custom_seed_v2"]) == 0
    assert json.loads(capsys.readouterr().out)["hash_value"] == 0.800272


def test_assign_with_config_uses_segment_and_metadata(capsys):
    """--config takes split, version, metadata and segment overrides from the registry."""
    argv = ["assign", "--experiment", "exp_personalization_001", "--user", "U3", "--config", CONFIG]
    assert main([*argv, "--segment", "high_intent"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert event["experiment_version"] == "3"
    assert event["split_ratio"] == {"A": 0.4, "B": 0.6}
    assert event["variant_metadata"]["tone"] in {"friendly", "professional"}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["assign", "--experiment", "e", "--user", "u", "--split", "A=0.6,B=0.3"], "must sum to 1.0"),
        (["assign", "--experiment", "e", "--user", "u", "--split", "A=half"], "not a number"),
        (["assign", "--experiment", "e", "--user", "u", "--split", "A0.5"], "VARIANT=SHARE"),
        (["assign", "--experiment", "nope", "--user", "u", "--config", CONFIG], "'nope' is not in"),
        (["assign", "--experiment", "e"], "--user"),
        (["assign", "--experiment", "e", "--input", "/no/such/file.csv"], "file not found"),
        (["validate-config", "/no/such.yaml"], "file not found"),
    ],
)
def test_usage_errors_exit_2_with_message(capsys, argv, fragment):
    """Bad flags and files give a one-line error and exit status 2, never a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_assign_file_streams_csv_and_reports_bad_rows(tmp_path, capsys):
    """--input CSV: good rows assigned in order, bad rows reported with line numbers and skipped, exit 1."""
    source = tmp_path / "users.csv"
    source.write_bytes(b"user_id,segment\nU123,\n,vip\nU456,vip\n" + b"\xff\xfe,x\n" + b"u2226676,\n")
    out = tmp_path / "out.csv"
    assert main(["assign", "--experiment", "exp_001", "--input", str(source), "--output", str(out)]) == 1
    rows = list(csv.DictReader(out.read_text(encoding="utf-8").splitlines()))
    assert [r["user_id"] for r in rows] == ["U123", "U456", "u2226676"]
    assert rows[0]["variant_id"] == "A"
    assert rows[0]["hash_value"] == "0.002099"
    assert rows[2]["variant_id"] == "B"
    err = capsys.readouterr().err
    assert f"{source}: line 3: skipped: user_id is empty" in err
    assert f"{source}: line 5: skipped: not UTF-8" in err
    assert "assigned 3 rows" in err


def test_assign_file_jsonl_matches_single_assignments(tmp_path, capsys):
    """JSON-lines input gives the same variants as one-by-one assignment; exit 0 with no bad rows."""
    from worker import ABAssignmentAgent

    source = tmp_path / "users.jsonl"
    users = [f"user-{i}" for i in range(1000)]
    source.write_text("".join(json.dumps({"user_id": u}) + "\n" for u in users), encoding="utf-8")
    assert main(["assign", "--experiment", "exp_x", "--split", "A=0.2,B=0.3,C=0.5", "--input", str(source)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    agent = ABAssignmentAgent({"A": 0.2, "B": 0.3, "C": 0.5})
    assert [r["variant_id"] for r in lines] == [agent.assign_user(u, "exp_x")["variant_id"] for u in users]


def test_assign_file_bad_jsonl_rows(tmp_path, capsys):
    """Each kind of bad JSON-lines row names its line."""
    source = tmp_path / "users.jsonl"
    source.write_text('{"user_id": "ok"}\nnot json\n[1]\n{"name": "x"}\n{"user_id": 5}\n', encoding="utf-8")
    assert main(["assign", "--experiment", "e", "--input", str(source)]) == 1
    err = capsys.readouterr().err
    for line, problem in [
        (2, "not JSON"),
        (3, "expected a JSON object"),
        (4, "missing field 'user_id'"),
        (5, "user_id must be a string"),
    ]:
        assert f"line {line}: skipped: {problem}" in err


def test_csv_without_user_id_column(tmp_path, capsys):
    """A CSV without user_id is a usage error naming the file and its columns."""
    source = tmp_path / "users.csv"
    source.write_text("customer,segment\nU1,a\n", encoding="utf-8")
    assert main(["assign", "--experiment", "e", "--input", str(source)]) == 2
    assert "missing column 'user_id'" in capsys.readouterr().err


def test_validate_config_ok_and_broken(tmp_path, capsys):
    """validate-config lists experiments; a broken file exits 2 naming experiment and field."""
    assert main(["validate-config", CONFIG]) == 0
    assert "all valid" in capsys.readouterr().out
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiments:\n  - id: e1\n    split: {A: 0.5}\n    colour: red\n", encoding="utf-8")
    assert main(["validate-config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "experiment 'e1'" in err
    assert "'colour'" in err
    assert "unknown key" in err


def test_run_processes_a_request_file(tmp_path, capsys):
    """run --input pumps requests to events, rows and dead letters; exit 1 because one was dead-lettered."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        '{"user_id": "U123", "experiment_id": "exp_001"}\n{"user_id": "U9", "experiment_id": "unknown"}\n',
        encoding="utf-8",
    )
    events, rows, dead = tmp_path / "events.jsonl", tmp_path / "rows.jsonl", tmp_path / "dead.jsonl"
    argv = ["run", "--config", CONFIG, "--input", str(requests), "--output", str(events), "--rows", str(rows)]
    assert main([*argv, "--dead-letters", str(dead)]) == 1
    (event,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert event["variant_id"] == "A"
    assert json.loads(rows.read_text())["EventId"] == event["event_id"]
    dead_letter = json.loads(dead.read_text())
    assert dead_letter["dead_letter_reason"] == "UnknownExperiment"
    assert dead_letter["line"] == 2
    assert "1 assigned, 1 dead-lettered" in capsys.readouterr().err


def test_run_input_prints_console_spans_beside_the_events(tmp_path, capsys, monkeypatch):
    """AB_WORKER_TELEMETRY=console with run --input: a span per request on stderr; stdout stays events only."""
    monkeypatch.setenv("AB_WORKER_TELEMETRY", "console")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        '{"user_id": "U123", "experiment_id": "exp_001"}\n{"user_id": "U9", "experiment_id": "exp_001"}\n',
        encoding="utf-8",
    )
    assert main(["run", "--config", CONFIG, "--input", str(requests)]) == 0
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert [event["user_id"] for event in events] == ["U123", "U9"]
    assert err.count('"name": "assignment-requests process"') == 2, err
    assert err.count('"name": "assignment-events publish"') >= 1, err


def test_run_without_experiments_is_a_usage_error(capsys, monkeypatch):
    """run with no registry says how to give one."""
    monkeypatch.delenv("AB_WORKER_EXPERIMENTS_FILE", raising=False)
    assert main(["run", "--input", CONFIG]) == 2
    assert "AB_WORKER_EXPERIMENTS_FILE" in capsys.readouterr().err


def test_bad_environment_setting_names_the_variable(capsys, monkeypatch):
    """An invalid AB_WORKER_* value names the variable."""
    monkeypatch.setenv("AB_WORKER_MAX_BATCH", "lots")
    assert main(["run", "--config", CONFIG]) == 2
    assert "AB_WORKER_MAX_BATCH" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["assign"], ["run"], ["validate-config"]])
def test_help_everywhere(command):
    """--help works for the tool and each command, via python -m worker."""
    result = subprocess.run(
        [sys.executable, "-m", "worker", *command, "--help"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert result.returncode == 0
    assert "usage: " in result.stdout


def test_assign_unknown_experiment_lists_the_configured_ones(capsys):
    """A typo in --experiment names every experiment the file has, as report does."""
    assert main(["assign", "--experiment", "exp_01", "--config", CONFIG, "--user", "U1"]) == 2
    err = capsys.readouterr().err
    assert "experiment 'exp_01' is not in" in err
    assert "exp_001, exp_checkout_copy, exp_checkout_cta, exp_personalization_001, exp_tone_abcd" in err


def test_assign_segment_without_a_split_of_its_own_is_refused_with_the_segments(capsys):
    """--segment hi_intent (for high_intent) stops with status 2, listing the segments, not the default split."""
    argv = ["assign", "--experiment", "exp_personalization_001", "--config", CONFIG, "--user", "U1"]
    assert main([*argv, "--segment", "hi_intent"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "--segment 'hi_intent' is not one of exp_personalization_001's segments (high_intent, low_intent)" in err
    assert "leave --segment out for the experiment's default split" in err
    assert main([*argv, "--segment", "high_intent"]) == 0
    assert json.loads(capsys.readouterr().out)["segment"] == "high_intent"


def test_assign_segment_of_an_experiment_without_segment_splits_is_accepted(capsys):
    """With one split for everyone a segment cannot pick the wrong one: it is recorded, as on the queue."""
    assert main(["assign", "--experiment", "exp_001", "--config", CONFIG, "--user", "U123", "--segment", "vip"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert (event["variant_id"], event["segment"]) == ("A", "vip")


def test_assign_file_notes_rows_whose_segment_has_no_split(tmp_path, capsys):
    """Rows with another segment get the default split, as on the queue; a note counts them per segment."""
    source = tmp_path / "users.csv"
    source.write_text("user_id,segment\nU1,high_intent\nU2,standard\nU3,hi_intent\nU4,standard\n", encoding="utf-8")
    assert main(["assign", "--experiment", "exp_personalization_001", "--config", CONFIG, "--input", str(source)]) == 0
    err = capsys.readouterr().err
    assert "assigned 4 rows" in err
    assert "note: 3 rows had a segment with no split of its own (hi_intent 1, standard 2)" in err
    assert "exp_personalization_001's segments: high_intent, low_intent" in err


def test_counts_of_one_read_in_the_singular(tmp_path, capsys):
    """'assigned 1 row', '1 experiment, valid': never '1 rows' or '1 experiments'."""
    source = tmp_path / "users.csv"
    source.write_text("user_id\nU1\n", encoding="utf-8")
    assert main(["assign", "--experiment", "exp_001", "--input", str(source)]) == 0
    assert "assigned 1 row (" in capsys.readouterr().err
    single = tmp_path / "one.yaml"
    single.write_text("experiments:\n  - id: e1\n    split: {A: 0.5, B: 0.5}\n", encoding="utf-8")
    assert main(["validate-config", str(single)]) == 0
    assert f"{single}: 1 experiment, valid" in capsys.readouterr().out


def test_run_rows_says_when_it_appends_to_rows_from_before(tmp_path, capsys):
    """--rows appends: the first run says nothing of it, the second says the file held rows (a report counts both)."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"user_id": "U123", "experiment_id": "exp_001"}\n', encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    argv = ["run", "--config", CONFIG, "--input", str(requests), "--output", str(tmp_path / "events.jsonl")]
    assert main([*argv, "--rows", str(rows)]) == 0
    assert "appended" not in capsys.readouterr().err
    assert main([*argv, "--rows", str(rows)]) == 0
    assert f"rows appended to {rows}, which held rows from before" in capsys.readouterr().err
    assert len(rows.read_text(encoding="utf-8").splitlines()) == 2


def test_assign_input_applies_an_experiment_s_gates(tmp_path, capsys):
    """An experiment with gates is decided row by row by them (it used to be refused): the registry's answers."""
    from datetime import UTC, datetime

    from worker import ExperimentRegistry

    users = tmp_path / "users.csv"
    users.write_text("user_id,country,app_version\nU1,US,5.3.0\nU2,FR,5.3.0\nqa-demo-user,,\n", encoding="utf-8")
    at = "2026-12-07T12:00:00Z"
    command = ["assign", "--experiment", "exp_checkout_cta", "--config", CONFIG, "--input", str(users), "--at", at]
    assert main(command) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    registry = ExperimentRegistry.load(CONFIG)
    when = datetime(2026, 12, 7, 12, tzinfo=UTC)
    contexts = {"U1": {"country": "US", "app_version": "5.3.0"}, "U2": {"country": "FR", "app_version": "5.3.0"}}
    for row in rows:
        expected = registry.assign("exp_checkout_cta", row["user_id"], context=contexts.get(row["user_id"]), at=when)
        assert (row["variant_id"], row["in_experiment"], row["reason"]) == (
            expected.variant_id,
            expected.in_experiment,
            expected.reason,
        )
    assert [row["reason"] for row in rows][1:] == ["targeting", "override"]
