"""``ab-worker stratify`` and ``ab-worker plan``: cohort assignment from a file, and test planning.

``worker.cli`` registers these with :func:`add_commands`. Exit statuses of ``stratify``: 0 written and
balanced, 3 written but a balance check failed, 2 bad input or arguments (nothing written). ``plan``
exits 0, or 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, TextIO

from worker.cli.common import ExitStatus, check_output, formatter, integer, report_error
from worker.domain.cohort.arms import Arm
from worker.domain.cohort.balance import DEFAULT_MIN_PER_CELL, DEFAULT_TOLERANCE, BalanceReport
from worker.domain.cohort.errors import CohortInputError
from worker.domain.cohort.members import has_bad_characters, value_problem
from worker.domain.cohort.records import RECORD_FIELDS
from worker.domain.cohort.stratify import DEFAULT_SEED, CohortAssignment, stratify_columns
from worker.domain.errors import UsageError
from worker.domain.srm.stats import ExperimentPlan, StatsInputError, plan_experiment
from worker.service.batch import has_formula_cell, spreadsheet_safe

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

STRATIFY_EPILOG = """\
Members are grouped by segment, ordered within a segment by
md5("{seed}:{experiment}:{member_id}") (ties by id), and cut into arms in the order
--arms lists them: equal arms get n // k each and the first n % k arms one more;
--weights uses largest-remainder apportionment. The same set of members always gets
the same assignment, whatever the row order.

examples:
  # the seed document's scenario: 250 customers, four equal arms
  ab-worker stratify customers.csv --experiment email-tone-2025 \\
      --arms control,treatment_1,treatment_2,treatment_3 \\
      --out assignments.csv --report report.json

  # a 50/25/25 split, a tone per segment, JSON lines in and out
  ab-worker stratify members.jsonl --experiment exp-7 --arms control,urgent,friendly \\
      --weights 0.5,0.25,0.25 --arm-variants tones.json --id-column user_id \\
      --out assignments.jsonl

  tones.json maps arm -> {segment: variant}:
      {"urgent": {"Standard": "urgent_v2", "New Customer": "urgent_welcome"}}

exit status:
  0  written, every balance check passed
  3  written, but a balance check failed (the report names the cells)
  2  bad input or arguments; every problem listed with file and line; nothing written
"""

PLAN_EPILOG = """\
Normal approximation for a two-sided two-proportion z-test of each treatment against
control: n = (z_a*sqrt(2*pbar*(1-pbar)) + z_b*sqrt(p1*q1 + p2*q2))^2 / (p2 - p1)^2,
pooled variance under H0, unpooled under H1 (Fleiss, no continuity correction).
The MDE solves that equation exactly for p2. No multiple-comparison correction
unless --bonferroni, which tests each of the k-1 comparisons at alpha/(k-1).

examples:
  # what can 62 customers per arm detect on a 25% open rate?
  ab-worker plan --arms 4 --per-arm 62 --baseline 0.25

  # how many per arm for a 15% relative lift, Bonferroni-corrected?
  ab-worker plan --arms 4 --baseline 0.25 --lift 0.15 --bonferroni
"""


# --- reading the cohort ------------------------------------------------------------------------


@dataclass(slots=True)
class _Problems:
    """Problems found in a file, kept with their line numbers so they print in file order."""

    path: str
    found: list[tuple[int, str]]

    def add(self, line: int, message: str) -> None:
        self.found.append((line, message))

    def raise_if_any(self) -> None:
        if self.found:
            self.found.sort(key=lambda item: item[0])
            raise CohortInputError(
                [
                    f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}"
                    for line, message in self.found
                ]
            )


@dataclass(slots=True)
class CohortColumns:
    """Member ids and segments read from a file, with the line each member came from."""

    member_ids: list[str]
    segments: list[str]
    lines: array[int]


def _read_text(path: Path) -> str:
    """The whole file as text (for small files: JSON lines, the variants file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CohortInputError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        _raise_encoding_problems(path, data)
        raise  # pragma: no cover - a whole-file decode error is always on some line


def _raise_encoding_problems(path: Path, data: bytes) -> None:
    """Raise :class:`CohortInputError` naming every line that is not valid UTF-8."""
    problems = _Problems(str(path), [])
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(number, f"not valid UTF-8 (byte {exc.start + 1} of the line)")
    problems.raise_if_any()


def read_cohort_csv(path: Path, id_column: str, segment_column: str) -> CohortColumns:
    """Read ``id_column`` and ``segment_column`` from a CSV file with a header row.

    Values are stripped of surrounding spaces; blank lines are skipped. The file is streamed, not
    loaded whole. Raises :class:`CohortInputError` listing every problem as ``file:line: message``.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as stream:
            return _parse_csv(stream, path, (id_column, segment_column))
    except UnicodeDecodeError:
        _raise_encoding_problems(path, path.read_bytes())
        raise  # pragma: no cover - a decode error is always on some line
    except OSError as exc:
        raise CohortInputError([f"{path}: cannot read: {exc.strerror or exc}"]) from None


def _parse_csv(stream: TextIO, path: Path, columns: tuple[str, str]) -> CohortColumns:
    id_column, segment_column = columns
    problems = _Problems(str(path), [])
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        problems.add(0, f"empty file: expected a header row naming {id_column!r} and {segment_column!r}")
        problems.raise_if_any()
    names = [name.strip() for name in header or []]
    missing = [name for name in columns if name not in names]
    if missing:
        problems.add(1, f"missing column(s) {', '.join(map(repr, missing))}; the header has {names}")
        problems.raise_if_any()
    id_at, segment_at = names.index(id_column), names.index(segment_column)
    width = max(id_at, segment_at) + 1
    cohort = CohortColumns([], [], array("L"))
    # One str object per distinct segment instead of one per row: saves ~50 MB per million rows.
    canonical: dict[str, str] = {}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.add(reader.line_num, f"unparseable CSV row: {exc}")
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < width:
            problems.add(reader.line_num, f"expected at least {width} fields, found {len(row)}")
            continue
        member_id, segment = row[id_at].strip(), row[segment_at].strip()
        if member_id and segment:  # inlined: this loop runs once per member
            cohort.member_ids.append(member_id)
            cohort.segments.append(canonical.setdefault(segment, segment))
            cohort.lines.append(reader.line_num)
        else:
            _add_member(cohort, problems, reader.line_num, (member_id, segment), columns)
    _check_characters(cohort, problems, columns)
    _check_duplicates(cohort, problems, id_column)
    problems.raise_if_any()
    return cohort


def read_cohort_jsonl(path: Path, id_column: str, segment_column: str) -> CohortColumns:
    """Read one JSON object per line; integer ids are accepted and written as strings."""
    columns = (id_column, segment_column)
    problems = _Problems(str(path), [])
    cohort = CohortColumns([], [], array("L"))
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(item, dict):
            problems.add(number, f"expected a JSON object, got {type(item).__name__}")
            continue
        member_id, segment = item.get(id_column), item.get(segment_column)
        if isinstance(member_id, int) and not isinstance(member_id, bool):
            member_id = str(member_id)
        for name, value in ((id_column, member_id), (segment_column, segment)):
            if value is None:
                problems.add(number, f"missing field {name!r}")
            elif not isinstance(value, str):
                problems.add(number, f"field {name!r} must be a string, got {json.dumps(value)}")
        if isinstance(member_id, str) and isinstance(segment, str):
            _add_member(cohort, problems, number, (member_id.strip(), segment.strip()), columns)
    _check_characters(cohort, problems, columns)
    _check_duplicates(cohort, problems, id_column)
    problems.raise_if_any()
    return cohort


def _add_member(
    cohort: CohortColumns,
    problems: _Problems,
    line: int,
    member: tuple[str, str],
    columns: tuple[str, str],
) -> None:
    (member_id, segment), (id_column, segment_column) = member, columns
    if not member_id:
        problems.add(line, f"empty {id_column!r}")
    if not segment:
        problems.add(line, f"empty {segment_column!r}" + (f" for {member_id!r}" if member_id else ""))
    if member_id and segment:
        cohort.member_ids.append(member_id)
        cohort.segments.append(segment)
        cohort.lines.append(line)


def _check_characters(cohort: CohortColumns, problems: _Problems, columns: tuple[str, str]) -> None:
    """Control characters (and, from JSON escapes, lone surrogates) are errors; one pass when clean."""
    if not has_bad_characters("".join(cohort.member_ids) + "".join(set(cohort.segments))):
        return
    for member_id, segment, line in zip(cohort.member_ids, cohort.segments, cohort.lines, strict=True):
        for column, value in zip(columns, (member_id, segment), strict=True):
            problem = value_problem(value)
            if problem:
                problems.add(line, f"{column!r}: {problem}")


def _check_duplicates(cohort: CohortColumns, problems: _Problems, id_column: str) -> None:
    if not cohort.member_ids and not problems.found:
        problems.add(0, "no members: the file has no data rows")
    if len(set(cohort.member_ids)) == len(cohort.member_ids):
        return
    first: dict[str, int] = {}
    for member_id, line in zip(cohort.member_ids, cohort.lines, strict=True):
        if member_id in first:
            problems.add(line, f"duplicate {id_column} {member_id!r} (first on line {first[member_id]})")
        else:
            first[member_id] = line


def read_cohort(path: Path, fmt: str, id_column: str, segment_column: str) -> CohortColumns:
    """Read a cohort file in ``fmt`` (``"csv"`` or ``"jsonl"``)."""
    reader = read_cohort_csv if fmt == "csv" else read_cohort_jsonl
    return reader(path, id_column, segment_column)


def _format_for(path: Path, given: str | None, what: str) -> str:
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


# --- the arm options ---------------------------------------------------------------------------


def _parse_arms(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def _parse_weights(text: str) -> tuple[list[Fraction | None], list[str]]:
    """Weights as exact fractions: ``0.25`` is 1/4 and ``1/3`` is accepted too."""
    weights: list[Fraction | None] = []
    problems = []
    for part in text.split(","):
        try:
            weights.append(Fraction(part.strip()))
        except (ValueError, ZeroDivisionError):
            weights.append(None)
            problems.append(f"--weights: {part.strip()!r} is not a number")
    return weights, problems


def read_arm_variants(path: Path, arm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{arm: {segment: variant}}`` from a JSON file; unknown arms and bad values are errors."""
    problems = _Problems(str(path), [])
    try:
        content: Any = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        problems.add(exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})")
        problems.raise_if_any()
    if not isinstance(content, dict):
        problems.add(0, "expected a JSON object mapping arm id to {segment: variant}")
        problems.raise_if_any()
    variants: dict[str, dict[str, str]] = {}
    for arm, mapping in content.items():
        if arm not in arm_ids:
            problems.add(0, f"unknown arm {arm!r}; --arms lists {', '.join(arm_ids)}")
        elif not isinstance(mapping, dict):
            problems.add(0, f"arm {arm!r}: expected an object of segment to variant id")
        else:
            bad = [s for s, v in mapping.items() if not isinstance(v, str) or not v.strip()]
            for segment in bad:
                problems.add(0, f"arm {arm!r}: variant for segment {segment!r} must be a non-empty string")
            variants[arm] = {s: v.strip() for s, v in mapping.items() if s not in bad}
    problems.raise_if_any()
    return variants


def build_arms(args: argparse.Namespace) -> list[Arm]:
    """The :class:`Arm` list from ``--arms``, ``--weights`` and ``--arm-variants``."""
    arm_ids = _parse_arms(args.arms)
    problems = [f"--arms: empty arm id at position {i + 1}" for i, a in enumerate(arm_ids) if not a]
    weights: list[Fraction | None] = [None] * len(arm_ids)
    if args.weights is not None:
        weights, weight_problems = _parse_weights(args.weights)
        problems += weight_problems
        if len(weights) != len(arm_ids):
            problems.append(f"--weights: {len(weights)} weights for {len(arm_ids)} arms")
    if problems:
        raise CohortInputError(problems)
    variants = read_arm_variants(args.arm_variants, arm_ids) if args.arm_variants else {}
    return [Arm(arm_id, weight, variants.get(arm_id)) for arm_id, weight in zip(arm_ids, weights, strict=True)]


def _parse_moment(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CohortInputError([f"--assigned-at: {text!r} is not an ISO 8601 timestamp"]) from None
    if moment.utcoffset() is None:
        raise CohortInputError([f"--assigned-at: {text!r} has no time zone; add Z or +00:00"])
    return moment


# --- writing -----------------------------------------------------------------------------------


def _write_all(outputs: Sequence[tuple[Path, Callable[[TextIO], object]]]) -> None:
    """Write every output to a temporary file beside it, then move them all into place.

    Every path is checked before anything is written, and a failure while writing leaves no output
    at all (not the first file without the second); errors name the user's path, never the
    temporary one.
    """
    for path, _ in outputs:
        check_output(path)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in outputs:
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            staged.append((temporary, path))
            try:
                with temporary.open("w", encoding="utf-8", newline="") as stream:
                    write(stream)
            except OSError as exc:
                raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None
        for temporary, path in staged:
            try:
                os.replace(temporary, path)
            except OSError as exc:
                raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)


def assignments_writer(fmt: str, assignment: CohortAssignment) -> Callable[[TextIO], None]:
    """What writes one row (CSV) or one object (JSON lines) per member, fields in RECORD_FIELDS order.

    CSV cells that a spreadsheet would run as a formula (leading ``=``, ``+``, ``-``, ``@``) get a
    leading ``'``, as spreadsheet-safe CSV writers do; JSON lines are written as they are.
    """

    def write_csv(stream: TextIO) -> None:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(RECORD_FIELDS)
        records = assignment.records
        rows = records.rows()
        first = next(records.rows(), None)
        # One pass in C over each column decides whether any cell needs quoting; most files need none.
        columns = (records.member_ids, set(records.segments), set(records.arms), set(records.variants), first or ())
        if any(has_formula_cell(column) for column in columns):
            rows = (tuple(spreadsheet_safe(cell) for cell in row) for row in rows)
        writer.writerows(rows)

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

    return write_csv if fmt == "csv" else write_jsonl


def report_writer(assignment: CohortAssignment, source: Path) -> Callable[[TextIO], object]:
    """What writes the run and its balance report as JSON."""
    document = {"input": str(source), **assignment.to_dict()}
    return lambda stream: stream.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def write_assignments(path: Path, fmt: str, assignment: CohortAssignment) -> None:
    """Write the assignments file (see :func:`assignments_writer`), atomically."""
    _write_all([(path, assignments_writer(fmt, assignment))])


def write_report(path: Path, assignment: CohortAssignment, source: Path) -> None:
    """Write the balance report file, atomically."""
    _write_all([(path, report_writer(assignment, source))])


# --- printing ----------------------------------------------------------------------------------


def render_table(report: BalanceReport) -> list[str]:
    """The segment × arm table with totals and shares, as a Markdown table."""
    table = report.table
    header = ["Segment", *table.arms, "Total"]
    body = [
        [segment, *(str(table.counts[segment][a]) for a in table.arms), str(table.row_totals[segment])]
        for segment in table.segments
    ]
    body.append(["Total", *(str(table.column_totals[a]) for a in table.arms), str(table.total)])
    total = max(table.total, 1)
    body.append(["Share", *(f"{table.column_totals[a] / total:.1%}" for a in table.arms), "100.0%"])
    body.append(["Target", *(f"{float(report.target_shares[a]):.1%}" for a in table.arms), "100.0%"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *(line(row) for row in body)]


def render_checks(report: BalanceReport) -> list[str]:
    """One ``PASS``/``FAIL`` line per check."""
    return [f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in report.checks]


def _print_problems(error: CohortInputError, limit: int) -> None:
    if len(error.problems) == 1:
        report_error("stratify", f"{error.problems[0]} (nothing was written)")
        return
    lines = [f"{len(error.problems)} problem(s) with the input; nothing was written"]
    lines += [f"  {problem}" for problem in error.problems[:limit]]
    if len(error.problems) > limit:
        lines.append(f"  … and {len(error.problems) - limit} more (raise --max-errors)")
    print("ab-worker stratify: error: " + "\n".join(lines), file=sys.stderr)


def _warn_unknown_segments(arms: Sequence[Arm], segments: set[str]) -> None:
    for arm in arms:
        for segment in sorted(set(arm.variants_by_segment or {}) - segments):
            print(
                f"warning: --arm-variants names segment {segment!r} for arm {arm.id!r},"
                " but no member is in that segment",
                file=sys.stderr,
            )


# --- the commands ------------------------------------------------------------------------------


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path can be written, and they differ: checked before the input is read."""
    try:
        check_output(args.out)
        if args.report is not None:
            check_output(args.report)
    except UsageError as exc:
        raise CohortInputError([str(exc)]) from None
    if args.report is not None and args.report.resolve() == args.out.resolve():
        raise CohortInputError([f"--report {args.report} is the same file as --out"])


def run_stratify(args: argparse.Namespace) -> int:
    """Handler of ``ab-worker stratify``: read, assign, check, write, print; the exit status."""
    try:
        arms = build_arms(args)
        moment = _parse_moment(args.assigned_at)
        _check_outputs(args)
        source_format = _format_for(args.input, args.format, "input")
        out_format = _format_for(args.out, None, "output")
        cohort = read_cohort(args.input, source_format, args.id_column, args.segment_column)
        assignment = stratify_columns(
            cohort.member_ids,
            cohort.segments,
            arms,
            experiment_id=args.experiment,
            seed=args.seed,
            tolerance=args.tolerance,
            min_per_cell=args.min_per_cell,
            assigned_at=moment,
        )
    except CohortInputError as error:
        _print_problems(error, args.max_errors)
        return ExitStatus.USAGE
    _warn_unknown_segments(arms, set(assignment.report.table.segments))
    outputs: list[tuple[Path, Callable[[TextIO], object]]] = [(args.out, assignments_writer(out_format, assignment))]
    if args.report is not None:
        outputs.append((args.report, report_writer(assignment, args.input)))
    _write_all(outputs)
    report = assignment.report
    print(
        f"Experiment {assignment.experiment_id!r}, seed {assignment.seed!r}:"
        f" {report.table.total} members in {len(report.table.segments)} segment(s),"
        f" {len(arms)} arm(s)"
    )
    print("\n".join(render_table(report)))
    print()
    print("\n".join(render_checks(report)))
    written = f"Wrote {args.out}" + (f" and {args.report}" if args.report is not None else "")
    print(written + ("." if report.passed else "; a balance check FAILED (exit status 3)."))
    return ExitStatus.OK if report.passed else ExitStatus.UNBALANCED


def render_plan(plan: ExperimentPlan) -> list[str]:
    """The plan as text: the test, the MDE at the given size, and the size for the given lift."""
    treatments = plan.arms - 1
    correction = (
        f"Bonferroni: alpha {plan.alpha:g} / {treatments} = {plan.alpha_per_comparison:.4g} per comparison"
        if plan.bonferroni
        else f"no multiple-comparison correction (--bonferroni tests each at alpha/{treatments})"
    )
    lines = [
        f"Two-sided two-proportion z-test, each of {treatments} treatment(s) against control;",
        f"alpha {plan.alpha:g}, {correction}; power {plan.power:g}.",
        "Normal approximation, pooled variance under H0 and unpooled under H1 (Fleiss);",
        "the MDE solves that equation exactly.",
        "",
    ]
    p1 = plan.baseline
    if plan.per_arm is not None:
        lines.append(f"With {plan.per_arm:,} per arm ({plan.per_arm * plan.arms:,} in all), baseline {p1:.2%}:")
        if plan.mde is None:
            lines.append("  minimum detectable effect: none; no rate up to 100% is detectable")
        else:
            mde = plan.mde
            lines += [
                f"  minimum detectable effect: {mde.absolute:+.2%} absolute"
                f" ({p1:.2%} -> {mde.treatment_rate:.2%}), {mde.relative:+.1%} relative",
                f"  (the pooled shortcut (z_a+z_b)*sqrt(2p(1-p)/n) would say {mde.shortcut_absolute:+.2%}"
                f" absolute, {mde.shortcut_absolute / p1:+.1%} relative)",
            ]
        lines.append(
            f"  power to detect a {plan.lift:.1%} relative lift ({p1:.2%} -> {plan.lift_rate:.2%}):"
            f" {plan.power_at_lift or 0.0:.1%}"
        )
        lines.append("")
    lines.append(f"For a {plan.lift:.1%} relative lift ({p1:.2%} -> {plan.lift_rate:.2%}) at power {plan.power:g}:")
    lines.append(
        f"  sample size: {plan.sample_size_for_lift:,} per arm,"
        f" {plan.sample_size_for_lift * plan.arms:,} across {plan.arms} arms"
    )
    return lines


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``ab-worker plan``: print (or emit as JSON) what the test can detect."""
    try:
        plan = plan_experiment(
            arms=args.arms,
            baseline=args.baseline,
            lift=args.lift,
            per_arm=args.per_arm,
            alpha=args.alpha,
            power=args.power,
            bonferroni=args.bonferroni,
        )
    except StatsInputError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(_plan_dict(plan), indent=2))
    else:
        print("\n".join(render_plan(plan)))
    return ExitStatus.OK


def _plan_dict(plan: ExperimentPlan) -> dict[str, Any]:
    mde = plan.mde
    return {
        "arms": plan.arms,
        "baseline": plan.baseline,
        "alpha": plan.alpha,
        "alpha_per_comparison": plan.alpha_per_comparison,
        "bonferroni": plan.bonferroni,
        "power": plan.power,
        "per_arm": plan.per_arm,
        "mde_absolute": None if mde is None else mde.absolute,
        "mde_relative": None if mde is None else mde.relative,
        "mde_treatment_rate": None if mde is None else mde.treatment_rate,
        "mde_shortcut_absolute": None if mde is None else mde.shortcut_absolute,
        "lift": plan.lift,
        "lift_rate": plan.lift_rate,
        "power_at_lift": plan.power_at_lift,
        "sample_size_per_arm_for_lift": plan.sample_size_for_lift,
    }


# --- argument parsing --------------------------------------------------------------------------


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be strictly between 0 and 1")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(Decimal(text))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to 1 (0.05 = 5 percentage points)")
    return value


def _add_stratify(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stratify",
        help="assign a cohort file to arms by stratified randomisation, with balance checks",
        description="Assign every member of a cohort file to an arm, stratified by segment, check the\n"
        "balance, write the assignments and print the segment × arm table with PASS/FAIL checks.",
        epilog=STRATIFY_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="cohort file: CSV with a header, or JSON lines")
    parser.add_argument("--experiment", required=True, help="experiment id (part of the hash key)")
    parser.add_argument("--arms", required=True, help="comma-separated arm ids, control first")
    parser.add_argument("--weights", help="comma-separated relative weights, one per arm (default: equal)")
    parser.add_argument(
        "--arm-variants",
        type=Path,
        metavar="FILE.json",
        help="JSON object: arm -> {segment: variant_id}; other cells get the arm id",
    )
    parser.add_argument("--seed", default=str(DEFAULT_SEED), help="hash seed (default: %(default)s)")
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        help="allowed absolute deviation of an arm's share (default: %(default)s)",
    )
    parser.add_argument(
        "--min-per-cell",
        type=integer(0),
        default=DEFAULT_MIN_PER_CELL,
        help="minimum members per segment per arm (default: %(default)s)",
    )
    parser.add_argument("--id-column", default="customer_id", help="member id column (default: %(default)s)")
    parser.add_argument("--segment-column", default="segment", help="segment column (default: %(default)s)")
    parser.add_argument("--format", choices=("csv", "jsonl"), help="input format (default: from the extension)")
    parser.add_argument("--out", type=Path, required=True, help="assignments file: .csv or .jsonl")
    parser.add_argument("--report", type=Path, help="balance report file (JSON)")
    parser.add_argument(
        "--assigned-at", metavar="ISO8601", help="timestamp for every record, e.g. 2025-11-23T09:00:00Z (default: now)"
    )
    parser.add_argument(
        "--max-errors", type=integer(1), default=50, help="input problems to print (default: %(default)s)"
    )
    parser.set_defaults(func=run_stratify)


def _add_plan(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="minimum detectable effect and sample size for an A/B/n test on a rate",
        description="Minimum detectable effect of each treatment against control at a given size\n"
        "per arm, and the size per arm a given relative lift needs.",
        epilog=PLAN_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--arms", type=integer(2), default=2, help="arms including control (default: %(default)s)")
    parser.add_argument("--per-arm", type=integer(1), help="members per arm, for the MDE and power")
    parser.add_argument("--baseline", type=_rate, required=True, help="control rate, e.g. 0.25 for a 25%% open rate")
    parser.add_argument("--alpha", type=_rate, default=0.05, help="two-sided significance level (default: %(default)s)")
    parser.add_argument("--power", type=_rate, default=0.8, help="target power (default: %(default)s)")
    parser.add_argument(
        "--lift", type=float, default=0.15, help="relative lift to size for, 0.15 = +15%% (default: %(default)s)"
    )
    parser.add_argument(
        "--bonferroni", action="store_true", help="test each of the arms-1 comparisons at alpha/(arms-1)"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.set_defaults(func=run_plan)


def add_commands(subparsers: Any) -> None:
    """Register ``stratify`` and ``plan``; each sets ``func(args) -> exit status``."""
    _add_stratify(subparsers)
    _add_plan(subparsers)
