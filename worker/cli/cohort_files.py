"""The files of ``ab-worker stratify``: the cohort and the arm variants read, the assignments and report written.

The cohort file is read by the one user-file reader (:mod:`worker.service.inputfile`: BOM, UTF-8,
whitespace) and its members checked by the one member check
(:func:`worker.domain.cohort.members.member_problems`); every problem is listed as ``file:line:``
and nothing is written. Outputs are written all or nothing (:func:`worker.cli.common.write_files`).
"""

from __future__ import annotations

import csv
import json
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, NoReturn, TextIO

from pydantic import JsonValue

from schemas.models import request_context_problem
from worker.cli.common import write_files
from worker.domain.cohort.allocation import DecidedMembers
from worker.domain.cohort.errors import CohortInputError
from worker.domain.cohort.members import member_problems
from worker.domain.cohort.records import RECORD_FIELDS
from worker.domain.cohort.stratify import CohortAssignment
from worker.domain.moments import utc_iso
from worker.service.batch import ColumnKinds, csv_context, has_formula_cell, spreadsheet_safe
from worker.service.inputfile import BOM, InputFileError, Problem, decoded_lines, read_table

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(slots=True)
class CohortColumns:
    """Member ids and segments read from a file, with the line each member came from (and contexts when asked)."""

    member_ids: list[str]
    segments: list[str]
    lines: array[int]
    #: One context per member (``None`` for none) when read with ``kinds``; else ``None``.
    contexts: list[dict[str, JsonValue] | None] | None = None


def _raise_if_any(path: Path, problems: list[Problem]) -> None:
    """:class:`CohortInputError` listing ``problems`` in line order, each naming the file (and line)."""
    if problems:
        problems.sort(key=lambda item: item[0])
        raise CohortInputError(
            [f"{path}:{line}: {message}" if line else f"{path}: {message}" for line, message in problems]
        )


def _refuse(path: Path, problems: list[Problem]) -> NoReturn:
    """:func:`_raise_if_any` where there is always a problem (so the type checker knows nothing follows)."""
    _raise_if_any(path, problems)
    raise AssertionError("unreachable: problems were given")  # pragma: no cover


def read_cohort(
    path: Path, fmt: str, id_column: str, segment_column: str, kinds: ColumnKinds | None = None
) -> CohortColumns:
    """Read ``id_column`` and ``segment_column`` of a cohort file in ``fmt`` (``"csv"`` or ``"jsonl"``).

    JSON integer ids are accepted and written as strings. The file is streamed, not loaded whole.
    ``kinds`` (the experiment's targeting, :func:`worker.service.batch.column_kinds`): also read each
    member's context, as ``assign --input`` reads a row's: a CSV's other columns, typed by what the
    targeting compares; a JSON line's ``context`` object. Raises :class:`CohortInputError` listing
    every problem as ``file:line: message``.
    """
    problems: list[Problem] = []
    cohort = CohortColumns([], [], array("L"))
    try:
        with path.open("rb") as binary:
            text = decoded_lines(binary, problems)
            if kinds is None:
                rows = read_table(text, fmt, (id_column, segment_column), problems)
                _collect(rows, cohort, json_values=fmt == "jsonl")
            elif fmt == "csv":
                rows = read_table(text, fmt, (id_column, segment_column), problems, rest=True)
                _collect_with_contexts(rows, fmt, kinds, cohort, problems)
            else:
                rows = read_table(text, fmt, (id_column, segment_column, "context"), problems, required=2)
                _collect_with_contexts(rows, fmt, kinds, cohort, problems)
    except OSError as exc:
        raise CohortInputError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except InputFileError as exc:
        _raise_if_any(path, [*problems, (exc.line, exc.message)])
    lines = cohort.lines
    found = member_problems(
        cohort.member_ids,
        cohort.segments,
        names=(repr(id_column), repr(segment_column)),
        earlier=lambda position: f"on line {lines[position]}",
    )
    problems += [(lines[position], problem) for position, problem in found]
    if not cohort.member_ids and not problems:
        problems.append((0, "no members: the file has no data rows"))
    _raise_if_any(path, problems)
    return cohort


def _collect(rows: Iterable[tuple[int, tuple[Any, ...]]], cohort: CohortColumns, *, json_values: bool) -> None:
    """Append each row's member to the columns; this loop runs once per member, so it stays lean.

    Values go in as read (``Any``: a JSON line's id may be any JSON value); ``member_problems``
    checks every one right after, and the columns leave ``read_cohort`` only when all are strings.
    """
    add_id, add_segment, add_line = cohort.member_ids.append, cohort.segments.append, cohort.lines.append
    # One str object per distinct segment instead of one per row: saves ~50 MB per million rows.
    canonical: dict[Any, Any] = {}
    same = canonical.setdefault
    if not json_values:  # CSV cells are always strings
        for line, (member_id, segment) in rows:
            add_id(member_id)
            add_segment(same(segment, segment))
            add_line(line)
        return
    for line, (member_id, segment) in rows:  # JSON integer ids are accepted and written as strings
        add_id(str(member_id) if type(member_id) is int else member_id)
        add_segment(same(segment, segment) if type(segment) is str else segment)
        add_line(line)


def _collect_with_contexts(
    rows: Iterable[tuple[int, tuple[Any, ...]]],
    fmt: str,
    kinds: ColumnKinds,
    cohort: CohortColumns,
    problems: list[Problem],
) -> None:
    """:func:`_collect`, with each member's context (checked by the wire contract's limits) beside it."""
    contexts: list[dict[str, JsonValue] | None] = []
    cohort.contexts = contexts
    for line, (member_id, segment, found) in rows:
        context: Any = csv_context(found, kinds) if fmt == "csv" else found
        problem = None if context is None else request_context_problem(context)
        if problem is not None:
            problems.append((line, f"context {problem}"))
        cohort.member_ids.append(str(member_id) if type(member_id) is int else member_id)
        cohort.segments.append(segment)
        cohort.lines.append(line)
        contexts.append(context or None if problem is None else None)


def format_for(path: Path, given: str | None, what: str) -> str:
    """``csv`` or ``jsonl``: ``given``, else from the extension; an error naming the file otherwise."""
    if given:
        return given
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CohortInputError(
            [
                f"{path}: cannot tell the {what} format from the extension; use .csv or .jsonl"
                + (" or pass --format" if what == "input" else "")
            ]
        )
    return fmt


def read_arm_variants(path: Path, arm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{arm: {segment: variant}}`` from a JSON file; unknown arms and bad values are errors."""
    problems: list[Problem] = []
    content = _read_json(path, problems)
    if not isinstance(content, dict):
        _refuse(path, [(0, "expected a JSON object mapping arm id to {segment: variant}")])
    variants: dict[str, dict[str, str]] = {}
    for arm, mapping in content.items():
        if arm not in arm_ids:
            problems.append((0, f"unknown arm {arm!r}; --arms lists {', '.join(map(repr, arm_ids))}"))
        elif not isinstance(mapping, dict):
            problems.append((0, f"arm {arm!r}: expected an object of segment to variant id"))
        else:
            bad = [s for s, v in mapping.items() if not isinstance(v, str) or not v.strip()]
            for segment in bad:
                problems.append((0, f"arm {arm!r}: variant for segment {segment!r} must be a non-empty string"))
            variants[arm] = {s: v.strip() for s, v in mapping.items() if s not in bad}
    _raise_if_any(path, problems)
    return variants


def _read_json(path: Path, problems: list[Problem]) -> object:
    """A small JSON document, decoded as the reader decodes (UTF-8 line by line, a leading BOM dropped)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CohortInputError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    text = "".join(decoded_lines(data.splitlines(keepends=True), problems)).removeprefix(BOM)
    _raise_if_any(path, problems)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _refuse(path, [(exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})")])


# --- writing -------------------------------------------------------------------------------------


def assignments_writer(
    fmt: str, assignment: CohortAssignment, decided: DecidedMembers | None = None
) -> Callable[[TextIO], None]:
    """What writes one row (CSV) or one object (JSON lines) per member, fields in RECORD_FIELDS order.

    The stratified members first, exactly as a cohort without allocation is written; then the
    members an allocation step decided (``decided``): no arm, their variant, and the step's reason as
    the ``assignment_method`` (only ``stratified_random`` members are in the experiment).
    CSV cells that a spreadsheet would run as a formula (leading ``=``, ``+``, ``-``, ``@``) get a
    leading ``'``, as spreadsheet-safe CSV writers do; JSON lines are written as they are.
    """
    records = assignment.records
    extra = [] if decided is None else decided_rows(decided, records.assigned_at, records.seed, records.experiment_id)

    def write_csv(stream: TextIO) -> None:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(RECORD_FIELDS)
        rows: Iterable[tuple[str, ...]] = records.rows()
        first = next(records.rows(), None)
        # One pass in C over each column decides whether any cell needs quoting; most files need none.
        columns = (records.member_ids, set(records.segments), set(records.arms), set(records.variants), first or ())
        if any(has_formula_cell(column) for column in columns):
            rows = (tuple(spreadsheet_safe(cell) for cell in row) for row in rows)
        writer.writerows(rows)
        writer.writerows(tuple(spreadsheet_safe(cell) for cell in row) for row in extra)

    def write_jsonl(stream: TextIO) -> None:
        # Everything but the member id repeats, so each line is assembled from pre-encoded parts.
        encoded: dict[tuple[str, str, str], str] = {}
        _, _, _, _, *constant = next(assignment.records.rows(), ("",) * len(RECORD_FIELDS))
        tail = "".join(
            f',"{name}":{encode_basestring(value)}' for name, value in zip(RECORD_FIELDS[4:], constant, strict=True)
        )
        for member_id, segment, arm, variant, *_ in assignment.records.rows():
            key = (segment, arm, variant)
            middle = encoded.get(key)
            if middle is None:
                middle = encoded[key] = (
                    f',"segment":{encode_basestring(segment)}'
                    f',"experiment_arm":{encode_basestring(arm)}'
                    f',"variant_id":{encode_basestring(variant)}'
                )
            stream.write(f'{{"customer_id":{encode_basestring(member_id)}{middle}{tail}}}\n')
        for row in extra:
            stream.write(
                json.dumps(dict(zip(RECORD_FIELDS, row, strict=True)), ensure_ascii=False, separators=(",", ":"))
            )
            stream.write("\n")

    return write_csv if fmt == "csv" else write_jsonl


def decided_rows(
    decided: DecidedMembers, assigned_at: datetime, seed: str, experiment_id: str
) -> list[tuple[str, ...]]:
    """The records of members an allocation step decided: no arm, their variant, the reason as the method."""
    when = utc_iso(assigned_at)
    return [
        (member_id, segment, "", decision.variant_id, when, decision.reason.value, seed, experiment_id)
        for member_id, segment, decision in zip(decided.member_ids, decided.segments, decided.decisions, strict=True)
    ]


def report_writer(
    assignment: CohortAssignment, source: Path, allocation: Mapping[str, Any] | None = None
) -> Callable[[TextIO], object]:
    """What writes the run and its balance report as JSON (and, when applied, the allocation's section)."""
    document = {"input": str(source), **assignment.to_dict()}
    if allocation is not None:
        document["allocation"] = dict(allocation)
    return lambda stream: stream.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def write_assignments(path: Path, fmt: str, assignment: CohortAssignment) -> None:
    """Write the assignments file (see :func:`assignments_writer`), atomically."""
    write_files([(path, assignments_writer(fmt, assignment))])


def write_report(path: Path, assignment: CohortAssignment, source: Path) -> None:
    """Write the balance report file, atomically."""
    write_files([(path, report_writer(assignment, source))])
