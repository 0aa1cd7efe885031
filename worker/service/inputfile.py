"""Reading a user's CSV or JSON-lines file, one way for every command that takes one.

``ab-worker assign --input`` and ``ab-worker stratify`` read the same kinds of files; what is
decided here holds for both formats and both commands:

* **UTF-8, line by line** (:func:`decoded_lines`). A line that is not UTF-8 is a problem naming the
  line; the other lines are still read, so one run lists every bad line.
* **A byte-order mark at the start of the file is dropped.** Spreadsheet programs write one; it is
  not part of the first column's name or of the first id. Anywhere else U+FEFF is data, and the id
  rule (:mod:`schemas.text`) refuses it by code point.
* **CSV**: the first row names the columns. Names and cells are stripped of surrounding whitespace:
  ``U1, vip`` is how people and many tools write the values ``U1`` and ``vip``, and a stray space
  would otherwise hash a different id or match no segment override, silently. Blank rows are skipped.
* **JSON lines**: one object per line, values exactly as the JSON gives them. Its quotes say where
  a string begins and ends, and a request's ids are hashed as given, as the worker hashes the same
  request from the queue. Blank lines are skipped.

A problem is ``(line, message)``, the caller decides what it means: ``assign`` skips the row,
``stratify`` writes nothing. A header without a required column cannot be read at all:
:class:`InputFileError`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, islice
from operator import itemgetter
from typing import Any, Protocol

from schemas.models import finite_json_float, refuse_json_constant
from worker.domain.errors import UsageError

#: ``(line, message)``; line 0 is the file as a whole.
Problem = tuple[int, str]
#: ``(line, values)``: one value per column asked for, ``None`` for an optional one the row lacks.
#: Any: each column's value as its format decodes it (a CSV cell, any JSON value, a CSV's other cells by name).
Row = tuple[int, tuple[Any, ...]]

BOM = "\ufeff"


class InputFileError(UsageError):
    """The file cannot be read as the command needs it (a required column is missing); nothing was read."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def decoded_lines(binary: Iterable[bytes], problems: list[Problem]) -> Iterator[str]:
    """UTF-8 lines of a file; a line that is not UTF-8 is added to ``problems`` and read as a blank line.

    Decoding line by line (instead of a text wrapper) keeps one bad byte from ending the run and
    lets the problem name the line. Lines are decoded a few thousand at a time in C, and handed on
    by C iterators; only a batch holding a bad line is decoded again one by one, to name it.
    """
    lines = iter(binary)
    done = 0

    def decode(batch: list[bytes]) -> list[str]:
        nonlocal done
        try:
            decoded = list(map(bytes.decode, batch))
        except UnicodeDecodeError:
            decoded = list(_decoded_one_by_one(batch, done, problems))
        done += len(batch)
        return decoded

    return chain.from_iterable(map(decode, iter(lambda: list(islice(lines, _DECODE_BATCH)), [])))


#: Lines decoded per C call by :func:`decoded_lines`.
_DECODE_BATCH = 4096


def _decoded_one_by_one(batch: list[bytes], before: int, problems: list[Problem]) -> Iterator[str]:
    for number, raw in enumerate(batch, start=before + 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((number, f"not UTF-8 (byte {exc.start + 1} of the line: {exc.reason})"))
            yield "\n"


def read_table(
    lines: Iterable[str],
    fmt: str,
    columns: Sequence[str],
    problems: list[Problem],
    *,
    required: int | None = None,
    rest: bool = False,
) -> Iterator[Row]:
    """``(line, values)`` for each row of a ``"csv"`` or ``"jsonl"`` file, in ``columns`` order.

    The first ``required`` columns (all by default) must be there: a CSV header without one raises
    :class:`InputFileError`, a JSON line without one is a problem. Rows that cannot be read go to
    ``problems`` and are skipped.

    ``rest`` (CSV only): each row gets one more value, ``{name: cell}`` of the header's other
    columns, stripped, empty cells left out (an empty cell says nothing); a column with an empty
    name is ignored, and a header naming one of them twice raises :class:`InputFileError`, since a
    cell could not say which it is. A JSON line's fields say what they are by themselves.
    """
    needed = len(columns) if required is None else required
    known = len(problems)  # the problems before this file's: its header is told apart by these
    stream = _without_bom(iter(lines))
    if fmt == "csv":
        return _csv_rows(stream, columns, needed, problems, known, rest=rest)
    return _json_rows(stream, columns, needed, problems)


def _without_bom(lines: Iterator[str]) -> Iterator[str]:
    first = next(lines, None)
    return iter(()) if first is None else chain((first.removeprefix(BOM),), lines)


def _csv_rows(
    lines: Iterator[str], columns: Sequence[str], needed: int, problems: list[Problem], known: int, *, rest: bool
) -> Iterator[Row]:
    reader = csv.reader(lines)
    try:
        header = next((row for row in reader if row), None)  # the first row that is not blank
    except csv.Error as exc:
        raise InputFileError(reader.line_num, f"unparseable CSV header: {exc}") from None
    if header is None or any(line <= reader.line_num for line, _ in problems[known:]):
        return  # no header, or one that is not UTF-8 (already a problem): no column can be found
    names = [name.strip() for name in header]
    missing = [name for name in columns[:needed] if name not in names]
    if missing:
        column = "column" if len(missing) == 1 else "columns"
        raise InputFileError(1, f"missing {column} {', '.join(map(repr, missing))}; the header has {names}")
    slots = [names.index(name) if name in names else None for name in columns]
    width = max((slot for slot in slots[:needed] if slot is not None), default=-1) + 1
    if rest:
        others = [(index, name) for index, name in enumerate(names) if name and name not in columns]
        yield from _csv_rows_with_rest(reader, others, slots, width, problems)
        return
    pick, full = _whole_row_picker(slots)
    strip = str.strip
    while True:
        try:
            for row in reader:
                if len(row) >= full:  # every column there and two fields or more (so not blank): most rows
                    yield reader.line_num, tuple(map(strip, pick(row)))
                elif not row or (len(row) == 1 and not row[0].strip()):
                    continue
                elif len(row) < width:
                    problems.append((reader.line_num, f"expected at least {width} fields, found {len(row)}"))
                else:
                    yield reader.line_num, tuple(_cell(row, slot) for slot in slots)
            return
        except csv.Error as exc:  # one row the parser refuses; the reader goes on with the next
            problems.append((reader.line_num, f"unparseable CSV row: {exc}"))


class _CsvReader(Protocol):
    """What ``csv.reader`` returns, as far as this module uses it: rows, and the line the last one ended on."""

    line_num: int

    def __iter__(self) -> Iterator[list[str]]: ...

    def __next__(self) -> list[str]: ...


def _csv_rows_with_rest(
    reader: _CsvReader,
    others: list[tuple[int, str]],
    slots: list[int | None],
    width: int,
    problems: list[Problem],
) -> Iterator[Row]:
    """:func:`_csv_rows` with ``others`` (position, header name) of each row as one more value, a dict by name."""
    named = [name for _, name in others]
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:
        raise InputFileError(1, f"column {', '.join(map(repr, twice))} appears more than once in the header")
    while True:
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) < width:
                    problems.append((reader.line_num, f"expected at least {width} fields, found {len(row)}"))
                    continue
                extra = {name: cell for index, name in others if index < len(row) and (cell := row[index].strip())}
                yield reader.line_num, (*(_cell(row, slot) for slot in slots), extra)
            return
        except csv.Error as exc:
            problems.append((reader.line_num, f"unparseable CSV row: {exc}"))


def _cell(row: list[str], slot: int | None) -> str | None:
    """The stripped cell at ``slot``; ``None`` for a column the header lacks or a short row leaves out."""
    return row[slot].strip() if slot is not None and slot < len(row) else None


def _whole_row_picker(slots: list[int | None]) -> tuple[Callable[[list[str]], Sequence[str]], float]:
    """What picks the cells of a row holding every column (in C), and the row length from which it applies."""
    present = [slot for slot in slots if slot is not None]
    if len(present) < len(slots) or not present:
        return (lambda row: ()), math.inf  # some column is optional and absent: every row goes the slow way
    # A slice for one column, so the picker always returns a sequence.
    pick = itemgetter(*present) if len(present) > 1 else itemgetter(slice(present[0], present[0] + 1))
    return pick, max(max(present) + 1, 2)


def _json_rows(lines: Iterator[str], columns: Sequence[str], needed: int, problems: list[Problem]) -> Iterator[Row]:
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            item = json.loads(text, parse_constant=refuse_json_constant, parse_float=finite_json_float)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not JSON: {exc.msg} (column {exc.colno})"))
            continue
        except RecursionError:
            problems.append((number, "not JSON: nested too deeply"))
            continue
        except ValueError as exc:  # NaN, Infinity, 1e400, an integer over 4,300 digits: the worker's InvalidJson
            problems.append((number, f"not JSON the worker accepts: {exc}"))
            continue
        if not isinstance(item, dict):
            problems.append((number, f"expected a JSON object, got {type(item).__name__}"))
            continue
        missing = [name for name in columns[:needed] if item.get(name) is None]
        if missing:
            problems.extend((number, f"missing field {name!r}") for name in missing)
            continue
        yield number, tuple(item.get(name) for name in columns)
