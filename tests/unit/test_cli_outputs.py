"""What the commands write and say: spreadsheet-safe CSV, all-or-nothing stratify outputs, every config
problem in one run, the one time grammar, the run summary, progress bars and the idle reload check."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.experiments import ReloadingRegistry
from tests.waiting import wait_for
from worker import ExperimentRegistry
from worker.cli import main
from worker.cli.common import ExitStatus
from worker.cli.demo import summary_table
from worker.cli.dlq import parse_time
from worker.cli.render.progress import file_progress
from worker.domain.errors import ConfigurationError
from worker.service.batch import spreadsheet_safe

FORMULAS = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)"]


def _cells(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as stream:
        return list(csv.reader(stream))


@pytest.mark.parametrize("cell", FORMULAS)
def test_spreadsheet_safe_quotes_formula_cells(cell: str) -> None:
    """Cells a spreadsheet would run get a leading quote; others are unchanged."""
    assert spreadsheet_safe(cell) == "'" + cell
    assert spreadsheet_safe("U123") == "U123"
    assert spreadsheet_safe("") == ""


def test_assign_csv_output_neutralises_formulas(tmp_path: Path) -> None:
    """`assign --output x.csv`: a user id like =HYPERLINK(...) is written as text, not a formula."""
    source = tmp_path / "users.jsonl"
    source.write_text("".join(json.dumps({"user_id": u}) + "\n" for u in [*FORMULAS, "U1"]), encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["assign", "--experiment", "e", "--input", str(source), "--output", str(out)]) == ExitStatus.OK
    users = [row[0] for row in _cells(out)[1:]]
    assert users == [*("'" + f for f in FORMULAS), "U1"]


def test_stratify_csv_output_neutralises_formulas(tmp_path: Path) -> None:
    """`stratify --out x.csv`: member ids and segments that look like formulas are quoted."""
    source = tmp_path / "cohort.csv"
    with source.open("w", encoding="utf-8", newline="") as stream:
        csv.writer(stream).writerows([("customer_id", "segment"), *((f, "@seg") for f in FORMULAS), ("plain", "@seg")])
    out = tmp_path / "out.csv"
    code = main(
        ["stratify", str(source), "--experiment", "x", "--arms", "a,b", "--out", str(out), "--min-per-cell", "0"]
    )
    assert code in (ExitStatus.OK, ExitStatus.UNBALANCED)  # five members cannot balance; the file is written
    rows = _cells(out)[1:]
    assert sorted(r[0] for r in rows) == sorted(["plain", *("'" + f for f in FORMULAS)])
    assert {r[1] for r in rows} == {"'@seg"}


def test_stratify_writes_nothing_when_the_report_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unwritable --report fails before --out is written, and the error names the user's path."""
    source = tmp_path / "cohort.csv"
    source.write_text("customer_id,segment\na,s\nb,s\n", encoding="utf-8")
    out, report = tmp_path / "out.csv", tmp_path / "folder"
    report.mkdir()
    argv = ["stratify", str(source), "--experiment", "x", "--arms", "a,b", "--out", str(out), "--report", str(report)]
    assert main(argv) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert not out.exists()
    assert f"{report}: is a directory" in err
    assert ".tmp" not in err
    assert set(tmp_path.iterdir()) == {source, report}  # no temporary file left behind either


def test_validate_config_lists_every_problem_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A field error does not hide the split-sum and duplicate-id problems of the other experiments."""
    path = tmp_path / "experiments.yaml"
    path.write_text(
        "experiments:\n"
        "  - {id: a, split: {A: 0.5, B: 0.5}, colour: red}\n"  # field error (unknown key)
        "  - {id: b, split: {A: 0.7, B: 0.7}}\n"  # split does not sum to 1
        "  - {id: c, split: {A: 1.0}}\n"
        "  - {id: c, split: {A: 1.0}}\n",  # duplicate id
        encoding="utf-8",
    )
    with pytest.raises(ConfigurationError) as caught:
        ExperimentRegistry.load(path)
    problems = str(caught.value).splitlines()
    assert any("'a'" in p and "colour" in p for p in problems)
    assert any("'b'" in p and "split" in p for p in problems)
    assert any("'c'" in p and "duplicate id" in p for p in problems)
    assert main(["validate-config", str(path)]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert err.startswith("ab-worker validate-config: error: 3 problems:\n")
    assert "duplicate id" in err
    assert "Traceback" not in err


def test_broken_edit_is_reported_on_the_reload_interval_while_idle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no message arriving (nothing calls current()), a broken edit is still logged at ERROR."""
    path = tmp_path / "experiments.yaml"
    path.write_text("experiments:\n  - {id: a, split: {A: 0.5, B: 0.5}}\n", encoding="utf-8")
    registry = ReloadingRegistry(path, interval=0.05)
    caplog.set_level(logging.ERROR)
    with registry.watching():
        path.write_text("experiments:\n  - {id: a, split: {A: 0.5, B: 0.6}}\n", encoding="utf-8")
        wait_for(lambda: registry.failed_reloads > 0, what="the watcher to try the broken edit")
    assert registry.failed_reloads == 1
    assert any(r.levelno == logging.ERROR and "NOT reloaded" in r.getMessage() for r in caplog.records)
    assert registry.current().get("a") is not None


def test_dlq_since_takes_the_same_durations_as_report() -> None:
    """`dlq peek --since 1w` means a week ago, as `report --since 1w` does; ISO times still work."""
    week_ago = parse_time("1w", "--since")
    assert week_ago is not None
    assert abs((datetime.now(UTC) - timedelta(weeks=1) - week_ago).total_seconds()) < 60
    assert parse_time("2025-11-23T09:00:00", "--since") == datetime(2025, 11, 23, 9, tzinfo=UTC)


def test_report_experiment_typo_names_the_experiments_seen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`report --experiment typo` is an error listing the experiments the rows do have."""
    from tests.synthetic_rows import make_rows, write_jsonl

    rows = write_jsonl(tmp_path / "rows.jsonl", make_rows("exp_real", {"A": 50, "B": 50}, {"A": 0.5, "B": 0.5}))
    assert main(["report", "--rows", str(rows), "--experiment", "exp_raal"]) == ExitStatus.USAGE
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "'exp_raal' is not in" in line
    assert "exp_real" in line


def test_run_summary_shows_targets_and_srm_p_value() -> None:
    """The demo summary puts each variant's target share beside its observed share, with the SRM p-value."""
    registry = ExperimentRegistry.from_dict(
        {
            "experiments": [
                {"id": "e", "split": {"A": 0.5, "B": 0.5}},
                {"id": "s", "split": {"A": 1.0}, "segments": {"x": {"A": 1.0}}},
            ]
        }
    )
    table = summary_table(
        Counter({("e", "A"): 44, ("e", "B"): 56, ("s", "A"): 3}), Counter({"InvalidJson": 1}), registry
    )
    e_a = next(line for line in table.splitlines() if line.startswith("e "))
    assert "44.0%" in e_a
    assert "50.0%" in e_a
    assert "p=0.23" in e_a
    assert "no mismatch" in e_a
    assert "split varies by segment" in table
    assert "{" not in table


def test_run_summary_counts_users_in_the_experiment_and_the_others_by_reason() -> None:
    """Only in-experiment users enter the shares and the SRM check; the others are listed by reason."""
    registry = ExperimentRegistry.from_dict(
        {"experiments": [{"id": "cta", "split": {"control": 0.5, "blue": 0.5}, "coverage": 0.5}]}
    )
    table = summary_table(
        Counter({("cta", "control"): 50, ("cta", "blue"): 50}),
        Counter(),
        registry,
        Counter({("cta", "coverage"): 90, ("cta", "override"): 1, ("gone", "stopped"): 7}),
    )
    lines = table.splitlines()
    control = next(line for line in lines if line.startswith("cta "))
    assert "50.0%" in control
    assert "p=1.00" in control
    assert any("not in it" in line and " 91 " in line and "coverage 90, override 1" in line for line in lines)
    assert any(line.startswith("gone ") and "not in it" in line and "stopped 7" in line for line in lines)
    assert "{" not in table


def test_demo_requests_keep_the_plain_experiments_stream_and_send_what_targeting_needs() -> None:
    """The plain experiments' 500 requests are those drawn before allocation (the README's numbers hold);
    the allocation experiments get contexts with country and app_version, and the QA override its request."""
    import random

    from worker.cli.demo import CAMPAIGNS, POISONED, demo_requests

    registry = ExperimentRegistry.load(Path(__file__).parents[2] / "deploy" / "experiments.yaml")
    bodies = [json.loads(body) for body in demo_requests(registry)[:-POISONED]]
    rng, plain = random.Random(2026), [e for e in registry if e.plain]
    for index, body in enumerate(bodies[:500]):  # the draw as it was, restated
        experiment = rng.choice(plain)
        assert (body["experiment_id"], body["user_id"]) == (experiment.id, f"U{100000 + rng.randrange(50000)}")
        assert body["context"] == {"campaign": rng.choice(CAMPAIGNS), "email": f"person{index}@example.com"}
        assert body["request_id"] == f"demo-{index:05d}"
        if experiment.config.segments:
            assert body["segment"] == rng.choice([*experiment.config.segments, "standard"])
    featured = bodies[500:]
    assert {body["experiment_id"] for body in featured} == {"exp_checkout_cta", "exp_checkout_copy"}
    assert any({"country", "app_version"} <= set(body.get("context", {})) for body in featured)
    assert {"user_id": "qa-demo-user", "experiment_id": "exp_checkout_cta"}.items() <= featured[-1].items()
    assert (
        sum(
            registry.assign(b["experiment_id"], b["user_id"], context=b.get("context")).in_experiment
            for b in featured
            if b["experiment_id"] == "exp_checkout_cta"
        )
        > 10
    )


def test_progress_bar_shows_percentage_and_eta() -> None:
    """A run over a file of known size draws a bar with a percentage and a remaining-time estimate."""
    binary = io.BytesIO(b"x\n" * 1000)
    screen = io.StringIO()
    with ExitStack() as stack:
        advance = file_progress(stack, binary, 2000, screen, "assigning")
        binary.read(1000)
        advance(500)
        binary.read()
    text = screen.getvalue()
    assert "100%" in text
    assert "00:00<00:00" in text  # tqdm's "elapsed<remaining"
