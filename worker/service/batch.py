"""Assigning a whole file of users: the same batch path the benchmark measures.

Reads JSON lines or CSV (a ``user_id`` column, optionally ``segment``) with the one user-file reader
(:mod:`worker.service.inputfile`), assigns in chunks with
:func:`worker.domain.assignment.bucket_ints`, and streams JSON lines or CSV out. Bad rows are reported with
their line number and skipped; they never stop the run.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from schemas.models import MAX_ID_CHARS
from schemas.text import text_problem
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
)


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
    counts: Counter[str] = field(default_factory=Counter)
    #: Rows per segment that has no split of its own in an experiment whose splits vary by segment.
    unsplit_segments: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Chunk:
    lines: list[int] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    segments: list[str | None] = field(default_factory=list)


def _check_user(user: Any) -> str | None:
    # The wire contract's rule for ids, so a file row and a queued request are judged alike.
    problem = text_problem(user, MAX_ID_CHARS)
    return None if problem is None else f"user_id {problem}"


def detect_format(path: Path, explicit: str | None) -> str:
    """``csv`` or ``jsonl``, from ``--format`` or the file extension."""
    if explicit:
        return explicit
    return "csv" if path.suffix.lower() in {".csv", ".tsv"} else "jsonl"


def read_rows(stream: Iterable[str], fmt: str, source: str, bad: list[BadRow]) -> Iterator[tuple[int, Any, Any]]:
    """Yield ``(line, user_id, segment)`` (a JSON line's segment may be in its ``context``); bad rows go to ``bad``.

    The file is read by the one user-file reader (:mod:`worker.service.inputfile`); a CSV header
    without ``user_id`` is a :class:`UsageError` naming ``source``.
    """
    problems: list[Problem] = []
    columns = ("user_id", "segment", "context")
    try:
        for line, (user, given, context) in read_table(stream, fmt, columns, problems, required=1):
            segment = context.get("segment") if given is None and isinstance(context, dict) else given
            yield line, user, segment if isinstance(segment, str) and segment else None
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
            _, experiment_id, _, _, _, version, seed = rows[0]
            constant = [experiment_id, version, seed, *{row[2] for row in rows}]
            if has_formula_cell(constant) or has_formula_cell(c for row in rows for c in (row[0], row[4])):
                rows = [tuple(spreadsheet_safe(c) if isinstance(c, str) else c for c in row) for row in rows]
            self._csv.writerows(rows)
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
    progress: Callable[[int], None] | None = None,
) -> BatchResult:
    """Assign every row of ``stream`` and write results to ``out``."""
    result = BatchResult()
    writer = _Writer(out, out_format)
    chunk = _Chunk()
    for line, user, segment in read_rows(stream, in_format, source, result.bad_rows):
        problem = _check_user(user)
        if problem is not None:
            result.bad_rows.append(BadRow(line, problem))
            continue
        chunk.lines.append(line)
        chunk.users.append(user)
        chunk.segments.append(segment)
        if len(chunk.users) >= CHUNK_ROWS:
            _flush_chunk(chunk, experiment, writer, result, progress)
            chunk = _Chunk()
    _flush_chunk(chunk, experiment, writer, result, progress)
    return result


def _flush_chunk(
    chunk: _Chunk,
    experiment: Experiment,
    writer: _Writer,
    result: BatchResult,
    progress: Callable[[int], None] | None,
) -> None:
    if not chunk.users:
        return
    config = experiment.config
    buckets = bucket_ints(config.seed, config.id, chunk.users)
    default = experiment.table
    if experiment.segment_tables and any(chunk.segments):
        result.unsplit_segments.update(s for s in chunk.segments if s and s not in experiment.segment_tables)
        tables = [experiment.table_for(s) for s in chunk.segments]
        variants = [t.variant_for(b) for t, b in zip(tables, buckets.tolist(), strict=True)]
    else:
        names = default.variant_ids
        variants = [names[i] for i in default.lookup()[buckets].tolist()]
    # m / 1e6 is already the nearest double to the 6-decimal value that assign_user rounds to.
    hashes = (buckets / BUCKETS).tolist()
    rows = [
        (user, config.id, variant, hv, segment or "", config.version, config.seed)
        for user, variant, hv, segment in zip(chunk.users, variants, hashes, chunk.segments, strict=True)
    ]
    writer.write(rows)
    result.counts.update(variants)
    result.assigned += len(rows)
    if progress is not None:
        progress(len(rows))
