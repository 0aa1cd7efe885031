"""``ab-worker report``: the table, --json, --html, exit statuses 0/1/2/4 and bad lines named by file and line."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from tests.synthetic_rows import make_rows, monitoring_rows, without_allocation, write_jsonl
from worker.cli import main
from worker.cli.common import ExitStatus

HALF = {"A": 0.5, "B": 0.5}


@pytest.fixture
def balanced(tmp_path: Path) -> Path:
    """Two balanced experiments."""
    rows = [*make_rows("exp_a", {"A": 100, "B": 101}, HALF), *make_rows("exp_b", {"A": 50, "B": 50}, HALF)]
    return write_jsonl(tmp_path / "balanced.jsonl", rows)


@pytest.fixture
def skewed(tmp_path: Path) -> Path:
    """Three experiments, ``exp_skewed`` 360/240 on 50/50."""
    return write_jsonl(tmp_path / "skewed.jsonl", monitoring_rows())


def report(*arguments: str | Path) -> int:
    return main(["report", *map(str, arguments)])


def test_balanced_rows_exit_0_with_a_table_per_experiment(balanced: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No mismatch: exit 0; each experiment has its verdict, targets, counts and shares."""
    assert report("--rows", balanced) == ExitStatus.OK
    out = capsys.readouterr().out
    assert "exp_a  n=201  OK  (chi2 0.00, dof 1, p=0.94)" in out
    assert "exp_b  n=100  OK" in out
    assert "  variant  target  expected  observed  share\n  A         50.0%     100.5       100  49.8%\n" in out
    assert "No sample ratio mismatch" in out
    assert "SRM!" not in out


def test_mismatch_exits_4_and_says_so_loudly(skewed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An SRM: exit 4, the verdict SRM! p=… on the experiment and a closing SAMPLE RATIO MISMATCH line."""
    assert report("--rows", skewed) == ExitStatus.SRM
    out = capsys.readouterr().out
    assert "exp_skewed  n=600  SRM! p=9.6e-07  (chi2 24.00, dof 1)" in out
    assert "exp_balanced  n=600  OK" in out
    assert out.rstrip().endswith("SAMPLE RATIO MISMATCH in 1 of 3: exp_skewed (p=9.6e-07, split A=0.5,B=0.5)")


def test_bad_lines_are_named_by_file_and_line_skipped_and_exit_1(
    balanced: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Malformed lines are reported as FILE:LINE with the problem, skipped, and make the exit status 1."""
    lines = balanced.read_text().splitlines()
    lines[2] = "{not json"
    lines[4] = json.dumps({**json.loads(lines[4]), "AssignedAt": "later"})
    lines[6] = "[1, 2]"
    lines.insert(8, "")  # blank lines are not errors
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    assert report("--rows", bad) == ExitStatus.PARTIAL
    captured = capsys.readouterr()
    assert f"skipped {bad}:3: not a JSON line" in captured.err
    assert f"skipped {bad}:5: column AssignedAt must be an ISO 8601 time, got 'later'" in captured.err
    assert f"skipped {bad}:7: a row must be a JSON object, got list" in captured.err
    assert "3 malformed lines skipped" in captured.err
    assert "298 assignments counted from 298 rows" in captured.out


def test_mismatch_wins_over_skipped_lines(skewed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With both an SRM and skipped lines the exit status is 4: the mismatch is what must not be missed."""
    skewed.write_text(skewed.read_text() + "garbage\n")
    assert report("--rows", skewed) == ExitStatus.SRM
    assert f"{skewed}:2001:" in capsys.readouterr().err


def test_max_errors_limits_what_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-errors caps the lines printed and says how many more there were."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("x\n" * 5)
    assert report("--rows", bad, "--max-errors", "2") == ExitStatus.PARTIAL
    err = capsys.readouterr().err
    assert err.count("not a JSON line") == 2
    assert "… and 3 more skipped lines" in err


def test_json_output(skewed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the report's dict, and only that, on stdout."""
    assert report("--rows", skewed, "--json", "--experiment", "exp_skewed") == ExitStatus.SRM
    document = json.loads(capsys.readouterr().out)
    assert document["srm_flagged"] == ["exp_skewed"]
    assert document["filters"]["experiment"] == "exp_skewed"
    (group,) = document["groups"]
    assert group["chi2"] == pytest.approx(24.0)
    assert group["flagged"] is True


def test_experiment_and_time_filters(skewed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--experiment, --since and --until narrow the rows; an ISO --since/--until window is honoured."""
    code = report(
        "--rows", skewed, "--experiment", "exp_tone", "--since", "2025-11-23T10:00:00Z", "--until", "2025-11-23T12:00"
    )
    assert code == ExitStatus.OK
    document_out = capsys.readouterr().out
    assert "exp_tone  n=266" in document_out
    assert "exp_skewed" not in document_out


def test_relative_since_excludes_old_rows(skewed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--since 2h counts back from now, so rows from 2025 are all outside it."""
    assert report("--rows", skewed, "--since", "2h") == ExitStatus.OK
    out = capsys.readouterr().out
    assert "0 assignments counted from 2,000 rows (0 duplicate EventIds dropped, 2,000 outside the filters)" in out
    assert "no assignments matched the filters" in out


def test_by_segment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--by segment prints one block per experiment × segment."""
    rows = [
        *make_rows("exp", {"A": 40, "B": 60}, {"A": 0.4, "B": 0.6}, segment="high_intent"),
        *make_rows("exp", {"A": 50, "B": 50}, HALF),
    ]
    assert report("--rows", write_jsonl(tmp_path / "rows.jsonl", rows), "--by", "segment") == ExitStatus.OK
    out = capsys.readouterr().out
    assert "exp / (no segment)  n=100  OK" in out
    assert "exp / high_intent  n=100  OK" in out


def test_several_files_and_standard_input(
    balanced: Path, skewed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rows takes several files, '-' is standard input, and rows seen in two of them count once."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(balanced.read_bytes())))
    assert report("--rows", "-", balanced, skewed) == ExitStatus.SRM
    out = capsys.readouterr().out
    assert "2,301 assignments counted from 2,602 rows (301 duplicate EventIds dropped" in out


def test_html_and_dead_letters(balanced: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--html writes the page; --dead-letters fills its dead-letter panel by reason."""
    dead = tmp_path / "dead.jsonl"
    dead.write_text(
        "\n".join(
            json.dumps({"dead_letter_reason": reason, "body": "x"})
            for reason in ["InvalidJson", "InvalidJson", "UnknownExperiment"]
        )
        + "\n"
    )
    page = tmp_path / "out" / "report.html"
    page.parent.mkdir()
    assert report("--rows", balanced, "--html", page, "--dead-letters", dead) == ExitStatus.OK
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert 'class="deadletters"' in text
    assert ">UnknownExperiment<" in text
    assert f"wrote {page}" in capsys.readouterr().err
    assert not list(page.parent.glob(".*.tmp"))


def test_rows_outside_the_experiment_are_listed_not_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rows file from the allocating worker: overrides beside bucketed rows are listed by reason and variant,
    not tested (exit 0, where counting them would be an SRM); old rows in the same file are counted; a bad
    InExperiment is a skipped line named by file, line and column; the HTML page has the reasons table."""
    rows = [
        *make_rows("exp", {"A": 505, "B": 495}, HALF),
        *make_rows("exp", {"B": 500}, HALF, reason="override"),
        *[without_allocation(row) for row in make_rows("exp_old", {"A": 50, "B": 50}, HALF)],
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    path.write_text(path.read_text() + json.dumps({**rows[0], "EventId": "bad", "InExperiment": "yes"}) + "\n")
    page = tmp_path / "report.html"
    assert report("--rows", path, "--html", page) == ExitStatus.PARTIAL
    captured = capsys.readouterr()
    assert f"skipped {path}:1601: column InExperiment must be true, false or null, got 'yes'" in captured.err
    out = captured.out
    assert out.startswith("1,100 assignments counted from 1,600 rows (500 not in the experiment,")
    assert "exp  n=1,000  OK" in out
    assert "exp_old  n=100  OK" in out
    assert (
        "Served but not in the experiment (not tested), by reason and variant:\n  exp  500: 500 override (B 500)\n"
        in out
    )
    assert 'data-reason="override"' in page.read_text()
    assert "(before allocation)" in page.read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((), "give the rows: --rows FILE [FILE ...] or --kusto"),
        (("--rows", "missing.jsonl"), "missing.jsonl: cannot read"),
        (("--rows", "{rows}", "--kusto"), "one of them"),
        (("--rows", "{rows}", "--since", "yesterday"), "argument --since: 'yesterday' is not an ISO 8601 time"),
        (("--rows", "{rows}", "--since", "1h", "--until", "2h"), "must be before --until"),
        (("--kusto",), "--kusto needs the cluster's query URI in AB_WORKER_KUSTO_QUERY_URI"),
        (("--rows", "{rows}", "--html", "/nonexistent-dir/r.html"), "cannot write"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    arguments: tuple[str, ...],
    message: str,
    balanced: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad usage or unreadable input: exit 2 and a message saying what is wrong."""
    monkeypatch.delenv("AB_WORKER_KUSTO_QUERY_URI", raising=False)
    monkeypatch.chdir(balanced.parent)
    assert report(*(a.format(rows=balanced) for a in arguments)) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert err.startswith("ab-worker report: error: ")
    assert message in err


def test_bad_flag_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse refuses bad choices with exit status 2."""
    assert report("--rows", "x", "--by", "country") == ExitStatus.USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_help_has_examples_and_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    """--help documents the sources, examples and every exit status, including 4 for a mismatch."""
    assert report("--help") == ExitStatus.OK
    out = capsys.readouterr().out
    assert "examples:\n  ab-worker report --rows out/rows.jsonl\n" in out
    assert "  4  a sample ratio mismatch in at least one experiment" in out
    assert "AssignmentEventsDedup()" in out
    assert "AB_WORKER_KUSTO_DATABASE" in out
