"""One user-file reader: ``assign --input`` and ``stratify`` read the same bytes alike (BOM, whitespace, UTF-8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.cli import main
from worker.cli.cohort_files import read_cohort
from worker.domain.assignment import ABAssignmentAgent
from worker.domain.cohort.errors import CohortInputError
from worker.domain.cohort.stratify import stratify
from worker.service.batch import BadRow, read_rows
from worker.service.inputfile import decoded_lines, read_table

BOM = "\ufeff".encode()

#: (case, file name, bytes, the (id, segment) pairs every command must read from them).
CASES = [
    ("csv", "c.csv", b"user_id,segment\nU1,vip\nU2,std\n", [("U1", "vip"), ("U2", "std")]),
    ("csv with a BOM", "c.csv", BOM + b"user_id,segment\nU1,vip\nU2,std\n", [("U1", "vip"), ("U2", "std")]),
    (
        "csv cells and names padded with spaces",
        "c.csv",
        b" user_id , segment\n U1 , vip \nU2,\tstd\n",
        [("U1", "vip"), ("U2", "std")],
    ),
    (
        "csv with CRLF and blank rows",
        "c.csv",
        b"user_id,segment\r\n\r\nU1,vip\r\n \r\nU2,std\r\n",
        [("U1", "vip"), ("U2", "std")],
    ),
    (
        "json lines",
        "c.jsonl",
        b'{"user_id": "U1", "segment": "vip"}\n{"user_id": "U2", "segment": "std"}\n',
        [("U1", "vip"), ("U2", "std")],
    ),
    (
        "json lines with a BOM",
        "c.jsonl",
        BOM + b'{"user_id": "U1", "segment": "vip"}\n\n{"user_id": "U2", "segment": "std"}\n',
        [("U1", "vip"), ("U2", "std")],
    ),
    # JSON quotes say where a value begins and ends: kept exactly, as the worker hashes a request.
    ("json values are exact", "c.jsonl", b'{"user_id": " U1", "segment": "vip "}\n', [(" U1", "vip ")]),
]


def _assign_reads(path: Path) -> tuple[list[tuple[object, str | None]], list[BadRow]]:
    bad: list[BadRow] = []
    problems: list[tuple[int, str]] = []
    fmt = "csv" if path.suffix == ".csv" else "jsonl"
    with path.open("rb") as binary:
        read = read_rows(decoded_lines(binary, problems), fmt, str(path), bad)
        rows = [(user, segment) for _, user, segment, _ in read]
    return rows, [*(BadRow(line, problem) for line, problem in problems), *bad]


def _stratify_reads(path: Path) -> list[tuple[str, str]]:
    cohort = read_cohort(path, "csv" if path.suffix == ".csv" else "jsonl", "user_id", "segment")
    return list(zip(cohort.member_ids, cohort.segments, strict=True))


@pytest.mark.parametrize(("case", "name", "data", "expected"), CASES, ids=[case[0] for case in CASES])
def test_both_commands_read_the_same_values(tmp_path: Path, case: str, name: str, data: bytes, expected: list) -> None:
    """assign --input and stratify read the same ids and segments from the same bytes."""
    path = tmp_path / name
    path.write_bytes(data)
    assigned, bad = _assign_reads(path)
    assert (assigned, bad) == (expected, [])
    assert _stratify_reads(path) == expected


def test_a_bom_inside_the_file_is_data_that_the_id_rule_refuses(tmp_path: Path) -> None:
    """Only the file's first BOM is dropped; one starting a later line is U+FEFF in the id, refused by code point."""
    path = tmp_path / "c.csv"
    path.write_bytes(b"user_id,segment\nU1,vip\n" + BOM + b"U2,vip\n")
    with pytest.raises(CohortInputError) as info:
        _stratify_reads(path)
    assert info.value.problems == (f"{path}:3: 'user_id': invisible or bidi character U+FEFF at index 0",)
    status = main(["assign", "--experiment", "e", "--input", str(path), "--output", str(tmp_path / "out.csv")])
    assert status == 1, "the row is skipped, the run goes on"


def test_a_padded_csv_id_gets_the_variant_of_the_id_without_the_spaces(tmp_path: Path) -> None:
    """``assign --input``: 'U123 , vip' assigns U123 (a stray space would silently hash another id)."""
    source = tmp_path / "users.csv"
    source.write_bytes(BOM + b"user_id , segment\nU123 , vip\n")
    out = tmp_path / "out.jsonl"
    assert main(["assign", "--experiment", "exp_001", "--input", str(source), "--output", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = ABAssignmentAgent({"A": 0.5, "B": 0.5}).assign_user("U123", "exp_001")
    assert (row["user_id"], row["segment"], row["variant_id"]) == ("U123", "vip", expected["variant_id"])


def test_a_line_that_is_not_utf8_is_named_alike_and_the_rest_is_read(tmp_path: Path) -> None:
    """Both commands name the same line with the same words; the lines after it are still read."""
    path = tmp_path / "c.csv"
    path.write_bytes(b"user_id,segment\nU1,vip\nU2,\xff\nU3,std\n")
    assigned, bad = _assign_reads(path)
    assert assigned == [("U1", "vip"), ("U3", "std")]
    assert bad == [BadRow(3, "not UTF-8 (byte 4 of the line: invalid start byte)")]
    with pytest.raises(CohortInputError) as info:
        _stratify_reads(path)
    assert info.value.problems == (f"{path}:3: not UTF-8 (byte 4 of the line: invalid start byte)",)


def test_a_header_that_is_not_utf8_is_one_problem_not_two(tmp_path: Path) -> None:
    """An undecodable header is reported once, not also as a header missing every column."""
    problems: list[tuple[int, str]] = []
    rows = list(read_table(decoded_lines([b"\xffuser_id\n", b"U1\n"], problems), "csv", ("user_id",), problems))
    assert (rows, problems) == ([], [(1, "not UTF-8 (byte 1 of the line: invalid start byte)")])


def test_lines_are_counted_across_decoding_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad line in a later batch of lines is named by its line in the file, not in its batch."""
    from worker.service import inputfile

    monkeypatch.setattr(inputfile, "_DECODE_BATCH", 2)
    problems: list[tuple[int, str]] = []
    lines = list(decoded_lines([b"a\n", b"b\n", b"c\n", b"\xfe\n", b"e\n"], problems))
    assert lines == ["a\n", "b\n", "c\n", "\n", "e\n"]
    assert [line for line, _ in problems] == [4]


def test_a_short_row_with_an_optional_column_absent_reads_none() -> None:
    """Optional columns past a short row's end, or missing from the header, read as None."""
    problems: list[tuple[int, str]] = []
    text = ["user_id,segment\n", "U1\n", "U2,vip\n"]
    rows = list(read_table(text, "csv", ("user_id", "segment", "context"), problems, required=1))
    assert (rows, problems) == ([(2, ("U1", None, None)), (3, ("U2", "vip", None))], [])


@pytest.mark.parametrize("bad", ["a\u202eb", "a\x1b[31mb", "a\u2066b"])
def test_member_errors_never_echo_the_characters_that_make_them_wrong(tmp_path: Path, bad: str) -> None:
    """The one member check names a refused character by code point, in the API and in files alike."""
    with pytest.raises(CohortInputError) as api:
        stratify([(bad, "s"), ("c", "s")], ["A", "B"], experiment_id="e")
    path = tmp_path / "c.csv"
    path.write_text(f"user_id,segment\n{bad},s\nc,s\n", encoding="utf-8")
    with pytest.raises(CohortInputError) as files:
        _stratify_reads(path)
    code = f"U+{ord(bad[1]):04X} at index 1"
    assert api.value.problems[0].endswith(code)
    assert files.value.problems[0].endswith(code)
    for message in (str(api.value), str(files.value)):
        assert bad[1] not in message
