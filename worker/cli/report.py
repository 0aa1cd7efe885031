"""``ab-worker report``: sample-ratio monitoring over recorded assignments, as a table, JSON or HTML.

``worker.cli`` registers it with :func:`add_commands`. The Kusto adapter is imported lazily, inside the handler, only
when ``--kusto`` is given, so ``worker/`` keeps no import-time dependency on an Azure SDK.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from worker.cli.common import (
    ExitStatus,
    Subcommands,
    UnreachableError,
    check_output,
    formatter,
    integer,
    moment,
    write_files,
)
from worker.domain.errors import UsageError
from worker.domain.moments import utc_iso
from worker.domain.plural import counted
from worker.domain.srm.format import format_p, format_split
from worker.domain.srm.report import GroupResult, Report, build_report, describe_outside
from worker.domain.srm.tally import ReportInputError, Tally, Window, parse_row
from worker.service.settings import WorkerSettings

QUERY_URI_VARIABLE = "AB_WORKER_KUSTO_QUERY_URI"
DATABASE_VARIABLE = "AB_WORKER_KUSTO_DATABASE"
DEFAULT_DATABASE = WorkerSettings.model_fields["kusto_database"].default

REPORT_EPILOG = f"""\
Counts assignments per experiment and variant, drops duplicate EventIds (redeliveries),
and tests each experiment's counts against its configured split (the rows' SplitRatio)
with Pearson's chi-square: p < 0.001 is a sample ratio mismatch (SRM), printed as
"SRM! p=...". An SRM means assignment or logging is broken: do not read the results.
Rows that carry different splits (segment overrides, a changed configuration) are each
expected under their own split; a note lists the splits seen and the most recent.

Only assignments in the experiment (InExperiment) are tested. Users who were served a
variant without being in it (override, draft, stopped, launched, not_started, ended,
targeting, holdout, layer, coverage) are listed per experiment by reason and variant,
never counted; an experiment with no in-experiment rows says "nothing to test". Rows
written before allocation (no InExperiment/Reason) count as in the experiment, with the
reason "(before allocation)".

sources:
  --rows FILE ...   JSON-lines files of AssignmentEvents rows, as `ab-worker run --rows`
                    writes them ("-" reads standard input); bad lines are reported as
                    FILE:LINE and skipped
  --kusto           the deduplicated view AssignmentEventsDedup() in Azure Data Explorer;
                    cluster from {QUERY_URI_VARIABLE} (https://<cluster>.<region>.kusto.windows.net),
                    database from {DATABASE_VARIABLE} (default {DEFAULT_DATABASE}); signs in with
                    DefaultAzureCredential (az login, workload or managed identity)

examples:
  ab-worker report --rows out/rows.jsonl
  ab-worker report --rows out/rows.jsonl --by segment --experiment exp_personalization_001
  ab-worker report --rows day1.jsonl day2.jsonl --since 2025-11-23T00:00:00Z --until 2025-11-24
  ab-worker report --rows out/rows.jsonl --html out/report.html --dead-letters out/dead-letters.jsonl
  {QUERY_URI_VARIABLE}=https://mycluster.westeurope.kusto.windows.net \\
      ab-worker report --kusto --since 24h --json

--since and --until take an ISO 8601 time (UTC unless it says otherwise) or a duration
back from now: 30m, 2h, 7d, 1w. --since is inclusive, --until exclusive.

exit status (the whole table: ab-worker --help):
  0  no sample ratio mismatch
  1  no mismatch, but some input lines were malformed and skipped
  2  bad usage or unreadable input (no file, no Kusto settings, an experiment not in the rows)
  4  a sample ratio mismatch in at least one experiment (or segment, with --by segment)
  5  the Kusto query could not reach the cluster or was refused
"""


# --- reading ----------------------------------------------------------------------------------------


@contextmanager
def _open(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = Path(path).open("rb")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with stream:
        yield stream


def _json_lines(path: str, problems: list[str]) -> Iterator[tuple[int, object]]:
    """``(line number, decoded value)`` for each non-blank line; undecodable lines go to ``problems``."""
    with _open(path) as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw)
            except (ValueError, RecursionError) as exc:
                problems.append(f"{path}:{number}: not a JSON line: {exc}")


def read_rows(paths: Sequence[str], tally: Tally, problems: list[str]) -> None:
    """Count every good row of every file into ``tally``; each bad line is added to ``problems``."""
    for path in paths:
        for number, value in _json_lines(path, problems):
            try:
                row = parse_row(value)
            except ReportInputError as exc:
                problems.append(f"{path}:{number}: {exc}")
                continue
            tally.add_row(row)


def read_dead_letters(path: str, problems: list[str]) -> dict[str, int]:
    """Dead letters by ``dead_letter_reason`` from a file ``run --dead-letters`` or ``dlq export`` wrote."""
    reasons: Counter[str] = Counter()
    for number, value in _json_lines(path, problems):
        reason = value.get("dead_letter_reason") if isinstance(value, dict) else None
        if not isinstance(reason, str) or not reason:
            problems.append(f"{path}:{number}: no dead_letter_reason")
            continue
        reasons[reason] += 1
    return dict(reasons)


def _query_kusto(tally: Tally) -> str:
    from adapters.kusto.query import KustoQueryError
    from worker import bootstrap

    settings = bootstrap.environment_settings()
    if not settings.kusto_query_uri:
        raise UsageError(
            f"--kusto needs the cluster's query URI in {QUERY_URI_VARIABLE}"
            " (e.g. https://mycluster.westeurope.kusto.windows.net)"
        )
    try:
        return bootstrap.assignment_counts(settings)(tally)
    except KustoQueryError as exc:
        raise UnreachableError(str(exc)) from None


# --- printing ---------------------------------------------------------------------------------------


def render_group(group: GroupResult) -> list[str]:
    """One experiment (or experiment × segment): a heading with the verdict and a row per variant."""
    # A flagged verdict already carries p; an unflagged one gets it here.
    details = [] if group.chi2 is None else [f"chi2 {group.chi2:.2f}", f"dof {group.dof}"]
    if group.p_value is not None and not group.flagged:
        details.append(format_p(group.p_value))
    lines = [f"{group.label}  n={group.total:,}  {group.verdict}" + (f"  ({', '.join(details)})" if details else "")]
    if not group.variants:
        return lines + [f"  note: {note}" for note in group.notes]
    header = ("variant", "target", "expected", "observed", "share")
    body = [
        (v.variant, f"{v.expected_share:.1%}", f"{v.expected:,.1f}", f"{v.observed:,}", f"{v.observed_share:.1%}")
        for v in group.variants
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    for row in (header, *body):
        cells = [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        lines.append("  " + "  ".join(cells))
    lines += [f"  note: {note}" for note in group.notes]
    return lines


def render_not_counted(report: Report) -> list[str]:
    """Per experiment, the assignments served outside it, by reason and variant (nothing when there are none)."""
    outside = [allocation for allocation in report.allocations if allocation.not_counted]
    if not outside:
        return []
    lines = ["Served but not in the experiment (not tested), by reason and variant:"]
    lines += [f"  {a.experiment}  {a.not_counted:,}: {describe_outside(a)}" for a in outside]
    return [*lines, ""]


def render_report(report: Report) -> list[str]:
    """The whole report as terminal text, ending with the verdict line."""
    lines = [report.counts_text, ""]
    for group in report.groups:
        lines += [*render_group(group), ""]
    lines += render_not_counted(report)
    lines += list(report.notes)
    flagged = report.flagged
    untested = report.untested
    if flagged:
        names = "; ".join(
            f"{g.label} ({format_p(g.p_value or 0.0)}, split {format_split(g.latest_split)})" for g in flagged
        )
        lines.append(f"SAMPLE RATIO MISMATCH in {len(flagged)} of {len(report.groups)}: {names}")
    elif report.groups and len(untested) == len(report.groups):
        lines.append(f"Nothing tested: no group had anything to test ({_labels(untested)}; see the notes).")
    elif untested:
        lines.append(
            f"No sample ratio mismatch in the {len(report.groups) - len(untested)} tested (chi-square, every"
            f" p >= {report.threshold:g}); not tested: {_labels(untested)} (see the notes)."
        )
    elif report.groups:
        lines.append(f"No sample ratio mismatch (chi-square, every p >= {report.threshold:g}).")
    return lines


def _labels(groups: Sequence[GroupResult]) -> str:
    return ", ".join(group.label for group in groups)


def _print_problems(problems: Sequence[str], limit: int) -> None:
    for problem in problems[:limit]:
        print(f"skipped {problem}", file=sys.stderr)
    if len(problems) > limit:
        print(f"… and {len(problems) - limit} more skipped lines (raise --max-errors)", file=sys.stderr)
    if problems:
        print(f"{counted(len(problems), 'malformed line')} skipped", file=sys.stderr)


def _write_html(path: Path, report: Report, source: str) -> None:
    from worker.cli.render.html import render_html

    write_files([(path, lambda stream: stream.write(render_html(report, source=source)))])


# --- the command ------------------------------------------------------------------------------------


def _window(args: argparse.Namespace) -> Window:
    since, until = args.since, args.until
    if since is not None and until is not None and since >= until:
        raise UsageError(f"--since ({utc_iso(since)}) must be before --until ({utc_iso(until)})")
    return Window(args.experiment, since, until)


def _check_experiment_seen(experiment: str | None, tally: Tally, source: str) -> None:
    """A typo in ``--experiment`` is an error that lists the experiments the rows do have."""
    if experiment is None or experiment in tally.experiments_seen:
        return
    seen = ", ".join(sorted(tally.experiments_seen)) or "none"
    raise UsageError(f"experiment {experiment!r} is not in {source}; the experiments there: {seen}")


def run_report(args: argparse.Namespace) -> int:
    """Handler of ``ab-worker report``: count, test, print (table or JSON), write HTML; the exit status."""
    if bool(args.rows) == bool(args.kusto):
        raise UsageError("give the rows: --rows FILE [FILE ...] or --kusto (one of them)")
    now = datetime.now(UTC)
    if args.html is not None:
        check_output(args.html)
    tally = Tally(_window(args))
    problems: list[str] = []
    if args.kusto:
        source = _query_kusto(tally)
    else:
        read_rows(args.rows, tally, problems)
        source = ", ".join(args.rows)
        _check_experiment_seen(args.experiment, tally, source)
    dead_letters = read_dead_letters(args.dead_letters, problems) if args.dead_letters else None
    report = build_report(tally, by_segment=args.by == "segment", generated_at=now, dead_letters=dead_letters)
    _print_problems(problems, args.max_errors)
    if args.html is not None:
        _write_html(args.html, report, source)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print("\n".join(render_report(report)))
    if args.html is not None:
        print(f"wrote {args.html}", file=sys.stderr)
    if report.flagged:
        return ExitStatus.SRM
    return ExitStatus.PARTIAL if problems else ExitStatus.OK


def add_commands(subparsers: Subcommands) -> None:
    """Register ``report``; it sets ``func(args) -> exit status``."""
    parser = subparsers.add_parser(
        "report",
        help="sample-ratio monitoring: assignments per variant against the split, SRM test, HTML",
        description="Count recorded assignments per experiment and variant, test them against the\n"
        "configured split for a sample ratio mismatch, and print a table (or JSON, or an HTML page).",
        epilog=REPORT_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--rows", nargs="+", action="extend", metavar="FILE", help="JSON-lines rows files ('-': standard input)"
    )
    parser.add_argument(
        "--kusto", action="store_true", help=f"query AssignmentEventsDedup() (needs {QUERY_URI_VARIABLE})"
    )
    parser.add_argument("--experiment", metavar="E", help="only this experiment")
    parser.add_argument(
        "--by",
        choices=("experiment", "segment"),
        default="experiment",
        help="test per experiment (default) or per segment",
    )
    now = datetime.now(UTC)
    parser.add_argument(
        "--since", type=moment(lambda: now), metavar="ISO|2h|7d", help="only assignments at or after this time"
    )
    parser.add_argument(
        "--until", type=moment(lambda: now), metavar="ISO|2h|7d", help="only assignments before this time"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--html", type=Path, metavar="FILE", help="also write a self-contained HTML report")
    parser.add_argument(
        "--dead-letters", metavar="FILE", help="dead letters (run --dead-letters / dlq export) for the HTML panel"
    )
    parser.add_argument("--max-errors", type=integer(1), default=50, help="bad lines to print (default: %(default)s)")
    parser.set_defaults(func=run_report)
