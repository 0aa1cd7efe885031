"""The ``stratify`` and ``plan`` commands: output, exit statuses 0/2/3, and error messages naming file and line."""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import pytest

from worker.cli import main
from worker.cli.cohort import add_commands
from worker.cli.common import ExitStatus

DATA = Path(__file__).resolve().parents[1] / "data" / "cohort_250.csv"
ARMS = "control,treatment_1,treatment_2,treatment_3"
MOMENT = "2025-11-23T09:00:00Z"


def stratify(tmp_path: Path, source: Path, *extra: str, out: str = "out.csv") -> int:
    return main(
        [
            "stratify",
            str(source),
            "--experiment",
            "email-tone-2025",
            "--arms",
            ARMS,
            "--assigned-at",
            MOMENT,
            "--out",
            str(tmp_path / out),
            "--report",
            str(tmp_path / "report.json"),
            *extra,
        ]
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def errors(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


# --- exit status 0 -----------------------------------------------------------------------------


def test_document_scenario_exits_zero_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 250-customer file is assigned, the table and three PASS lines are printed, and status is 0."""
    assert stratify(tmp_path, DATA) == ExitStatus.OK
    out = capsys.readouterr().out
    assert "| High-Value Recent |      21 |          21 |          21 |          21 |     84 |" in out
    assert "| Standard          |      37 |          36 |          36 |          36 |    145 |" in out
    assert "| New Customer      |       6 |           5 |           5 |           5 |     21 |" in out
    assert "| Total             |      64 |          62 |          62 |          62 |    250 |" in out
    assert out.count("PASS  ") == 3
    assert "FAIL" not in out


def test_assignments_and_report_are_written(tmp_path: Path) -> None:
    """The CSV has a header and one row per member; the report JSON says every check passed."""
    stratify(tmp_path, DATA)
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 250
    assert list(rows[0]) == [
        "customer_id",
        "segment",
        "experiment_arm",
        "variant_id",
        "assigned_at",
        "assignment_method",
        "seed",
        "experiment_id",
    ]
    assert {(r["assigned_at"], r["assignment_method"], r["seed"]) for r in rows} == {
        (MOMENT, "stratified_random", "42")
    }
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["balance"]["passed"] is True
    assert report["input"] == str(DATA)
    assert report["members"] == 250


def test_row_order_does_not_change_the_output(tmp_path: Path) -> None:
    """A shuffled copy of the input produces a byte-identical assignments file."""
    lines = DATA.read_text(encoding="utf-8").splitlines()
    body = lines[1:]
    random.Random(5).shuffle(body)
    shuffled = write(tmp_path / "shuffled.csv", "\n".join([lines[0], *body]) + "\n")
    stratify(tmp_path, DATA, out="a.csv")
    stratify(tmp_path, shuffled, out="b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_jsonl_in_and_out_with_other_columns(tmp_path: Path) -> None:
    """JSON lines input with custom column names and integer ids; JSON lines output."""
    source = tmp_path / "members.jsonl"
    rng = random.Random(3)
    lines = [json.dumps({"user_id": i, "tier": rng.choice(["gold", "silver"])}) for i in range(200)]
    write(source, "\n".join(lines) + "\n\n")
    status = stratify(tmp_path, source, "--id-column", "user_id", "--segment-column", "tier", out="out.jsonl")
    assert status == ExitStatus.OK
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 200
    assert records[0]["customer_id"].isdigit()
    assert set(records[0]) == {
        "customer_id",
        "segment",
        "experiment_arm",
        "variant_id",
        "assigned_at",
        "assignment_method",
        "seed",
        "experiment_id",
    }


def test_format_option_overrides_the_extension(tmp_path: Path) -> None:
    """--format jsonl reads a .txt file as JSON lines."""
    source = write(tmp_path / "members.txt", "".join(f'{{"customer_id": "c{i}", "segment": "s"}}\n' for i in range(40)))
    assert stratify(tmp_path, source, "--format", "jsonl") == ExitStatus.OK


def test_weights_and_arm_variants(tmp_path: Path) -> None:
    """--weights apportions unequally and --arm-variants sets the variant per segment."""
    variants = write(tmp_path / "tones.json", json.dumps({"treatment_1": {"Standard": "urgent_v2"}}))
    status = stratify(
        tmp_path, DATA, "--weights", "0.4,0.2,0.2,0.2", "--arm-variants", str(variants), "--min-per-cell", "4"
    )
    assert status == ExitStatus.OK
    with (tmp_path / "out.csv").open(encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert sum(r["experiment_arm"] == "control" for r in rows) == 100  # 33.6 + 58 + 8.4, rounded per segment
    standard_t1 = {r["variant_id"] for r in rows if r["experiment_arm"] == "treatment_1" and r["segment"] == "Standard"}
    assert standard_t1 == {"urgent_v2"}


def test_variants_for_an_absent_segment_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A segment in --arm-variants that no member has is a warning, not an error."""
    variants = write(tmp_path / "tones.json", json.dumps({"control": {"Standrad": "generic"}}))
    assert stratify(tmp_path, DATA, "--arm-variants", str(variants)) == ExitStatus.OK
    assert "warning: --arm-variants names segment 'Standrad' for arm 'control'" in errors(capsys)


# --- exit status 3 -----------------------------------------------------------------------------


def test_failed_check_exits_three_after_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A minimum of 6 per cell fails for New Customer: FAIL names the cells, files are written, status 3."""
    assert stratify(tmp_path, DATA, "--min-per-cell", "6") == ExitStatus.UNBALANCED
    out = capsys.readouterr().out
    assert "FAIL  min_members_per_cell" in out
    assert "New Customer × treatment_1 = 5" in out
    assert "control" not in out.split("FAIL  min_members_per_cell")[1].split("\n")[0].split("New Customer × t")[0]
    assert (tmp_path / "out.csv").exists()
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["balance"]["passed"] is False


# --- exit status 2 -----------------------------------------------------------------------------


def test_missing_column_names_file_and_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A header without the segment column is reported against line 1 of the file."""
    source = write(tmp_path / "c.csv", "customer_id,tier\na,x\n")
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    assert f"{source}:1: missing column 'segment'" in errors(capsys)
    assert not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "report.json").exists()


def test_every_row_problem_is_listed_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Duplicate ids, empty ids, empty segments and short rows are all listed, in line order."""
    text = "customer_id,segment\na,s\nb,s\n,s\nc,\na,t\n\nd\nb,s\n"
    source = write(tmp_path / "c.csv", text)
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    err = errors(capsys)
    assert "5 problems" in err
    expected = [
        f"{source}:4: 'customer_id': empty",
        f"{source}:5: 'segment': empty",
        f"{source}:6: duplicate 'customer_id' 'a' (first on line 2)",
        f"{source}:8: expected at least 2 fields, found 1",
        f"{source}:9: duplicate 'customer_id' 'b' (first on line 3)",
    ]
    positions = [err.index(line) for line in expected]
    assert positions == sorted(positions)
    assert not (tmp_path / "out.csv").exists()


def test_unparseable_csv_row_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A row the CSV parser rejects (a field over its size limit) is reported; later rows are still checked."""
    source = write(tmp_path / "c.csv", 'customer_id,segment\na,s\n"' + "x" * 200_000 + '",s\n,s\n')
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    err = errors(capsys)
    assert f"{source}:3: unparseable CSV row: field larger than field limit" in err
    assert f"{source}:4: 'customer_id': empty" in err


def test_control_characters_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ids and segments with control characters (NUL, tab) are rejected with their line."""
    source = write(tmp_path / "c.csv", "customer_id,segment\na,s\nb\x00,s\nc,s\tx\n")
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    err = errors(capsys)
    assert f"{source}:3: 'customer_id': control character U+0000 at index 1" in err
    assert f"{source}:4: 'segment': control character U+0009 at index 1" in err


def test_invalid_utf8_lines_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every line that is not UTF-8 is named."""
    source = tmp_path / "c.csv"
    source.write_bytes(b"customer_id,segment\na,s\nb,\xff\nc,s\nd,\xfe\xfe\n")
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    err = errors(capsys)
    assert f"{source}:3: not UTF-8" in err
    assert f"{source}:5: not UTF-8" in err


def test_jsonl_problems_are_reported_with_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Invalid JSON, non-objects, missing and mistyped fields are each reported with their line."""
    lines = [
        '{"customer_id": "a", "segment": "s"}',
        "{not json",
        "[1, 2]",
        '{"customer_id": "b"}',
        '{"customer_id": true, "segment": "s"}',
        '{"customer_id": "\\ud800", "segment": "s"}',
    ]
    source = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    err = errors(capsys)
    assert f"{source}:2: not JSON" in err
    assert f"{source}:3: expected a JSON object, got list" in err
    assert f"{source}:4: missing field 'segment'" in err
    assert f"{source}:5: 'customer_id': must be a string, got bool" in err
    assert f"{source}:6: 'customer_id': not encodable as UTF-8" in err


def test_unknown_arm_in_arm_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An arm in --arm-variants that --arms does not list is an error naming the file."""
    variants = write(tmp_path / "tones.json", json.dumps({"treatment_9": {"Standard": "x"}}))
    assert stratify(tmp_path, DATA, "--arm-variants", str(variants)) == ExitStatus.USAGE
    assert f"{variants}: unknown arm 'treatment_9'" in errors(capsys)


def test_invalid_arm_variants_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed variants file is reported with its line."""
    variants = write(tmp_path / "tones.json", '{\n  "control": {"Standard": }\n}')
    assert stratify(tmp_path, DATA, "--arm-variants", str(variants)) == ExitStatus.USAGE
    assert f"{variants}:2: invalid JSON" in errors(capsys)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--weights", "0.5,0.5"], "--weights: 2 weights for 4 arms"),
        (["--weights", "0.5,x,0.25,0.25"], "--weights: 'x' is not a number"),
        (["--weights", "0.5,0,0.25,0.25"], "weight must be a finite number > 0"),
        (["--arms", "control,,b"], "--arms: empty arm id at position 2"),
        (["--arms", "a,a"], "duplicate arm id 'a'"),
        (["--assigned-at", "yesterday"], "not an ISO 8601 timestamp"),
        (["--assigned-at", "2025-11-23T09:00:00"], "has no time zone"),
    ],
)
def test_bad_arm_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str) -> None:
    """Weight count mismatches, unparseable or zero weights, empty or duplicate arms and bad timestamps exit 2."""
    assert stratify(tmp_path, DATA, *extra) == ExitStatus.USAGE
    assert fragment in errors(capsys)


def test_missing_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing input file is reported by name, without a traceback."""
    missing = tmp_path / "nope.csv"
    assert stratify(tmp_path, missing) == ExitStatus.USAGE
    err = errors(capsys)
    assert f"{missing}: cannot read" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "content"), [("empty.csv", ""), ("header.csv", "customer_id,segment\n")])
def test_empty_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str) -> None:
    """An empty file and a header-only file are bad input."""
    source = write(tmp_path / name, content)
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    assert str(source) in errors(capsys)


def test_unknown_extensions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Input and output formats must be known from the extension (or --format for input)."""
    source = write(tmp_path / "c.txt", "customer_id,segment\na,s\n")
    assert stratify(tmp_path, source) == ExitStatus.USAGE
    assert "cannot tell the input format" in errors(capsys)
    assert stratify(tmp_path, DATA, out="out.parquet") == ExitStatus.USAGE
    assert "cannot tell the output format" in errors(capsys)


def test_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output folder that does not exist is reported, not raised."""
    assert stratify(tmp_path, DATA, out="missing/out.csv") == ExitStatus.USAGE
    assert "cannot write" in errors(capsys)


def test_long_problem_lists_are_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-errors bounds the printed problems and says how many more there are."""
    source = write(tmp_path / "c.csv", "customer_id,segment\n" + ",s\n" * 30)
    assert stratify(tmp_path, source, "--max-errors", "5") == ExitStatus.USAGE
    err = errors(capsys)
    assert "30 problems" in err
    assert "… and 25 more" in err


def test_argparse_errors_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing required option is a usage error with status 2."""
    assert main(["stratify", str(DATA), "--arms", ARMS, "--out", "x.csv"]) == ExitStatus.USAGE
    assert "--experiment" in errors(capsys)


# --- plan --------------------------------------------------------------------------------------


def test_plan_for_the_documents_62_per_arm(capsys: pytest.CaptureFixture[str]) -> None:
    """62 per arm on a 25% baseline: MDE +24.07 pp (+96.3%), 7.6% power for +15%, 2,193 per arm needed."""
    assert main(["plan", "--arms", "4", "--per-arm", "62", "--baseline", "0.25"]) == ExitStatus.OK
    out = capsys.readouterr().out
    assert "minimum detectable effect: +24.07% absolute (25.00% -> 49.07%), +96.3% relative" in out
    assert "power to detect a 15.0% relative lift (25.00% -> 28.75%): 7.6%" in out
    assert "sample size: 2,193 per arm, 8,772 across 4 arms" in out
    assert "no multiple-comparison correction" in out


def test_plan_with_bonferroni(capsys: pytest.CaptureFixture[str]) -> None:
    """--bonferroni tests each of 3 comparisons at 0.05/3 and needs 2,925 per arm for +15%."""
    assert main(["plan", "--arms", "4", "--per-arm", "62", "--baseline", "0.25", "--bonferroni"]) == ExitStatus.OK
    out = capsys.readouterr().out
    assert "Bonferroni: alpha 0.05 / 3 = 0.01667 per comparison" in out
    assert "+112.1% relative" in out
    assert "sample size: 2,925 per arm" in out


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the numbers for machines; without --per-arm only the sample size is given."""
    assert main(["plan", "--baseline", "0.10", "--lift", "0.2", "--json"]) == ExitStatus.OK
    document = json.loads(capsys.readouterr().out)
    assert document["sample_size_per_arm_for_lift"] == 3841
    assert document["mde_absolute"] is None
    assert document["arms"] == 2


def test_plan_rejects_impossible_lift(capsys: pytest.CaptureFixture[str]) -> None:
    """A lift that takes the rate past 100% exits 2 with a message."""
    assert main(["plan", "--baseline", "0.9", "--lift", "0.2"]) == ExitStatus.USAGE
    assert "lift must be" in errors(capsys)


@pytest.mark.parametrize("extra", [["--baseline", "1.5"], ["--baseline", "0.2", "--arms", "1"], ["--baseline", "x"]])
def test_plan_usage_errors(capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    """Rates outside (0, 1), one arm and non-numbers are usage errors (status 2)."""
    assert main(["plan", *extra]) == ExitStatus.USAGE
    capsys.readouterr()


# --- registration ------------------------------------------------------------------------------


def test_add_commands_registers_on_a_host_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """The lead's CLI can mount both commands; each sets func, and help shows examples and exit statuses."""
    parser = argparse.ArgumentParser(prog="ab-worker")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--baseline", "0.25"])
    assert args.func(args) == ExitStatus.OK
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args(["stratify", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text
    assert "exit status:" in help_text
    assert "ab-worker stratify customers.csv" in help_text
