"""Assigning a whole file of users, as the worker would decide each one's request.

Reads JSON lines or CSV (a ``user_id`` column, optionally ``segment``; a JSON line's ``context``
object, a CSV's other columns) with the one user-file reader (:mod:`worker.service.inputfile`) and
streams JSON lines or CSV out, every row with ``in_experiment`` and ``reason``. An experiment that
uses no allocation step is the seed rule alone, assigned in chunks with
:func:`worker.domain.assignment.bucket_ints` (the path the benchmark measures); any other is decided
row by row by its allocation walk (``docs/allocation.md``), at one decision time for the whole file.
Bad rows are reported with their line number and skipped; they never stop the run.

**A CSV has no types**, so the experiment's targeting gives its context cells theirs
(:func:`csv_value`): a cell compared with numbers is a number when it is one in JSON's spelling, a
cell compared with booleans is ``true`` or ``false``, every other cell is text as written, and an
empty cell is a missing attribute. ``user_id`` and ``segment`` are never converted.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pydantic import JsonValue

from schemas.models import MAX_ID_CHARS, MAX_SEGMENT_CHARS, effective_segment, request_context_problem
from schemas.text import text_problem
from worker.domain.allocation import AllocatedExperiment, operand_kinds
from worker.domain.assignment import BUCKETS, bucket_ints
from worker.domain.errors import UsageError
from worker.domain.registry import Experiment
from worker.service.inputfile import InputFileError, Problem, read_table

CHUNK_ROWS = 65_536
OUTPUT_FIELDS = (
    "user_id",
    "experiment_id",
    "variant_id",
    "hash_value",
    "segment",
    "experiment_version",
    "seed",
    "in_experiment",
    "reason",
)
#: ``in_experiment`` as a CSV cell: JSON's spelling, so both outputs read alike.
_CSV_BOOL = {True: "true", False: "false"}


@dataclass(slots=True)
class BadRow:
    """A row that was skipped, and why."""

    line: int
    problem: str


@dataclass(slots=True)
class BatchResult:
    """What a batch run did."""

    assigned: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    #: Rows per variant served, in the experiment or not.
    counts: Counter[str] = field(default_factory=Counter)
    #: Rows per reason (``bucketed`` are the rows in the experiment).
    reasons: Counter[str] = field(default_factory=Counter)
    #: Rows per segment that has no split of its own in an experiment whose splits vary by segment.
    unsplit_segments: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Chunk:
    lines: list[int] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    segments: list[str | None] = field(default_factory=list)
    contexts: list[dict[str, JsonValue] | None] = field(default_factory=list)


def _check_user(user: object) -> str | None:
    # The wire contract's rule for ids, so a file row and a queued request are judged alike.
    problem = text_problem(user, MAX_ID_CHARS)
    return None if problem is None else f"user_id {problem}"


def _check_segment(segment: str | None) -> str | None:
    problem = None if segment is None else text_problem(segment, MAX_SEGMENT_CHARS)
    return None if problem is None else f"segment {problem}"


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

#: Per context column, the kinds of value the experiment's targeting compares it with.
ColumnKinds = Mapping[str, frozenset[str]]


def csv_value(cell: str, kinds: frozenset[str]) -> JsonValue:
    """A CSV context cell as the kind of value its targeting compares it with; text otherwise.

    A CSV has no types, and targeting compares within one kind (``docs/allocation.md`` §2.5): read
    as text, ``age: {$gte: 18}`` could never match a CSV; read by its looks, the version ``5.3`` or
    the zip code ``12345`` would become a number and stop matching their text operands. So the
    experiment says: a cell its targeting compares with numbers is a number when it is one in JSON's
    spelling (``18``, ``-2.5``, ``1e3``; not ``018``, ``1,000``, ``+5``, ``NaN``); a cell compared
    with ``true``/``false`` is a boolean when it is ``true`` or ``false``; every other cell is text.
    """
    if "number" in kinds and _JSON_NUMBER.fullmatch(cell) is not None:
        try:
            number: JsonValue = json.loads(cell)
        except ValueError:  # an integer over Python's 4,300-digit limit: left as text, refused as too long
            return cell
        return number
    if "boolean" in kinds and cell in {"true", "false"}:
        return cell == "true"
    return cell


def csv_context(cells: Mapping[str, str], kinds: ColumnKinds) -> dict[str, JsonValue]:
    """The context of a CSV row from its other columns, each cell read by :func:`csv_value`."""
    untyped: frozenset[str] = frozenset()
    return {name: csv_value(cell, kinds.get(name, untyped)) for name, cell in cells.items()}


def column_kinds(allocation: AllocatedExperiment) -> ColumnKinds:
    """What :func:`csv_value` reads each column as, from the experiment's targeting (none: all text)."""
    condition = allocation.targeting
    return {} if condition is None else operand_kinds(condition)


def detect_format(path: Path, explicit: str | None) -> str:
    """``csv`` or ``jsonl``, from ``--format`` or the file extension."""
    if explicit:
        return explicit
    return "csv" if path.suffix.lower() in {".csv", ".tsv"} else "jsonl"


def read_rows(
    stream: Iterable[str], fmt: str, source: str, bad: list[BadRow], *, kinds: ColumnKinds | None = None
) -> Iterator[tuple[int, object, str | None, dict[str, JsonValue] | None]]:
    """Yield ``(line, user_id, segment, context)``; rows that cannot be read go to ``bad``.

    The segment is the request's effective one (a JSON line's ``segment``, else its context's). A
    JSON line's ``context`` must be an object within the wire contract's limits, as in a request.
    ``kinds``: also read a CSV's other columns into the context (:func:`csv_context`), which only
    an experiment with allocation steps needs; without it a CSV row's context is ``None``. The file
    is read by the one user-file reader (:mod:`worker.service.inputfile`); a CSV header without
    ``user_id`` is a :class:`UsageError` naming ``source``.
    """
    problems: list[Problem] = []
    csv_rest = kinds is not None and fmt == "csv"
    columns = ("user_id", "segment") if fmt == "csv" else ("user_id", "segment", "context")
    try:
        for line, values in read_table(stream, fmt, columns, problems, required=1, rest=csv_rest):
            user, given = values[0], values[1]
            found: Any = csv_context(values[2], kinds or {}) if csv_rest else (values[2] if fmt != "csv" else None)
            problem = None if found is None else request_context_problem(found)
            if problem is not None:
                bad.append(BadRow(line, f"context {problem}"))
                continue
            segment = effective_segment(given if isinstance(given, str) and given else None, found)
            yield line, user, segment, found or None
    except InputFileError as exc:
        raise UsageError(f"{source}: line {exc.line}: {exc.message}") from None
    finally:
        bad.extend(BadRow(line, message) for line, message in problems)


#: First characters that make a spreadsheet read a CSV cell as a formula (OWASP "CSV injection").
_FORMULA_STARTS = frozenset("=+-@\t\r")


def spreadsheet_safe(cell: str) -> str:
    """``cell`` with a leading ``'`` when a spreadsheet would run it as a formula, else unchanged."""
    return "'" + cell if cell[:1] in _FORMULA_STARTS else cell


_FORMULA_LINE = re.compile(r"^[=+\-@\t\r]", re.MULTILINE)


def has_formula_cell(cells: Iterable[str]) -> bool:
    """Whether any of ``cells`` needs :func:`spreadsheet_safe` (one regex pass, not a Python loop)."""
    return _FORMULA_LINE.search("\n".join(cells)) is not None


class _Writer:
    def __init__(self, out: IO[str], fmt: str) -> None:
        self._out = out
        self._fmt = fmt
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(OUTPUT_FIELDS)

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        if self._csv is not None:
            # Experiment id, version and seed are the same on every row of a run; users and segments vary.
            _, experiment_id, _, _, _, version, seed, _, _ = rows[0]
            constant = [experiment_id, version, seed, *{row[2] for row in rows}]
            if has_formula_cell(constant) or has_formula_cell(c for row in rows for c in (row[0], row[4])):
                rows = [tuple(spreadsheet_safe(c) if isinstance(c, str) else c for c in row) for row in rows]
            bools = _CSV_BOOL
            self._csv.writerows((*row[:7], bools[row[7]], row[8]) for row in rows)
            return
        dumps = json.dumps
        self._out.write(
            "".join(dumps(dict(zip(OUTPUT_FIELDS, row, strict=True)), ensure_ascii=False) + "\n" for row in rows)
        )


def assign_file(
    stream: Iterable[str],
    out: IO[str],
    experiment: Experiment,
    *,
    in_format: str,
    out_format: str,
    source: str,
    at: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> BatchResult:
    """Decide every row of ``stream`` at the decision time ``at`` (aware; ``None``: now) and write it to ``out``.

    One ``at`` for the whole file, so a file is decided as one moment: a row near the end is not
    decided after an experiment's ``end_at`` that the first rows were decided before.
    """
    at = datetime.now(UTC) if at is None else at
    if at.tzinfo is None:
        raise ValueError("the decision time must be timezone-aware (UTC)")
    result = BatchResult()
    writer = _Writer(out, out_format)

    def flush(chunk: _Chunk) -> None:
        if not chunk.users:
            return
        rows = _bucketed_rows(chunk, experiment) if experiment.plain else _decided_rows(chunk, experiment, at)
        writer.write(rows)
        if experiment.segment_tables:
            tables = experiment.segment_tables
            result.unsplit_segments.update(s for s in chunk.segments if s and s not in tables)
        result.counts.update(row[2] for row in rows)
        result.reasons.update(row[8] for row in rows)
        result.assigned += len(rows)
        if progress is not None:
            progress(len(rows))

    chunk = _Chunk()
    kinds = None if experiment.plain else column_kinds(experiment.allocation)
    for line, user, segment, context in read_rows(stream, in_format, source, result.bad_rows, kinds=kinds):
        problem = _check_user(user) or _check_segment(segment)
        if problem is not None or not isinstance(user, str):  # only a string passes the check
            result.bad_rows.append(BadRow(line, problem or "user_id must be a string"))
            continue
        chunk.lines.append(line)
        chunk.users.append(user)
        chunk.segments.append(segment)
        chunk.contexts.append(context)
        if len(chunk.users) >= CHUNK_ROWS:
            flush(chunk)
            chunk = _Chunk()
    flush(chunk)
    return result


def _bucketed_rows(chunk: _Chunk, experiment: Experiment) -> list[tuple[Any, ...]]:
    """The seed rule over a whole chunk at once: every user of an experiment without allocation steps is bucketed."""
    config = experiment.config
    buckets = bucket_ints(config.seed, config.id, chunk.users)
    default = experiment.table
    if experiment.segment_tables and any(chunk.segments):
        tables = [experiment.table_for(s) for s in chunk.segments]
        variants = [t.variant_for(b) for t, b in zip(tables, buckets.tolist(), strict=True)]
    else:
        names = default.variant_ids
        variants = [names[i] for i in default.lookup()[buckets].tolist()]
    # m / 1e6 is already the nearest double to the 6-decimal value that assign_user rounds to.
    hashes = (buckets / BUCKETS).tolist()
    return [
        (user, config.id, variant, hv, segment or "", config.version, config.seed, True, "bucketed")
        for user, variant, hv, segment in zip(chunk.users, variants, hashes, chunk.segments, strict=True)
    ]


def _decided_rows(chunk: _Chunk, experiment: Experiment, at: datetime) -> list[tuple[Any, ...]]:
    """Each row by the experiment's allocation walk, as the worker decides each request."""
    config = experiment.config
    decide = experiment.allocation.decide
    rows = []
    for user, segment, context in zip(chunk.users, chunk.segments, chunk.contexts, strict=True):
        variant, in_experiment, reason, hash_value, _ = decide(user, segment, context, at)
        row = (user, config.id, variant, hash_value, segment or "", config.version, config.seed)
        rows.append((*row, in_experiment, reason.value))
    return rows
