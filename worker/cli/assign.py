"""``ab-worker assign`` and ``ab-worker validate-config``: the MD5 rule from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from worker.bootstrap import ExperimentRegistry
from worker.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    Subcommands,
    add_decision_arguments,
    check_input,
    check_output,
    formatter,
    moment,
    open_output,
    parse_split,
)
from worker.domain.errors import ConfigurationError, PermanentError, UsageError
from worker.domain.moments import utc_iso
from worker.domain.plural import counted
from worker.domain.registry import Experiment


def _registry_for(args: argparse.Namespace) -> ExperimentRegistry:
    if args.config:
        if args.split or args.seed:
            raise UsageError("--split and --seed come from the experiment in --config; do not pass both")
        return ExperimentRegistry.load(args.config)
    split = parse_split(args.split) if args.split else {"A": 0.5, "B": 0.5}
    return ExperimentRegistry.single(args.experiment, split, seed=args.seed or "echovoice")


def _experiment(registry: ExperimentRegistry, experiment_id: str) -> Experiment:
    """The experiment; a usage error listing the configured ones when it is not there (a typo, say)."""
    experiment = registry.get(experiment_id)
    if experiment is None:
        configured = ", ".join(sorted(e.config.id for e in registry)) or "none"
        raise UsageError(
            f"experiment {experiment_id!r} is not in {registry.source}; the experiments there: {configured}"
        )
    return experiment


def check_segment(experiment: Experiment, segment: str | None) -> None:
    """A usage error when ``segment`` has no split of its own in an experiment whose splits vary by segment.

    On the queue such a segment is legitimate and gets the experiment's split. Typed on the command
    line it is far more likely a typo (``hi_intent`` for ``high_intent``) that would print an
    assignment from the wrong split without a word. An experiment without per-segment splits gives
    every segment its one split, so any segment is accepted there.
    """
    segments = experiment.config.segments
    if segment is None or not segments or segment in segments:
        return
    raise UsageError(
        f"--segment {segment!r} is not one of {experiment.config.id}'s segments ({', '.join(sorted(segments))});"
        " leave --segment out for the experiment's default split"
    )


def cmd_assign(args: argparse.Namespace) -> int:
    """Assign one user (prints the event) or every row of ``--input`` (streams results)."""
    registry = _registry_for(args)
    experiment = _experiment(registry, args.experiment)
    at = args.at or datetime.now(UTC)
    if args.input:
        if args.segment:
            raise UsageError("--segment is for one --user; with --input each row's segment column is used")
        if args.context is not None:
            raise UsageError("--context is for one --user; with --input each row's context is used")
        return _assign_file(args, experiment, at)
    if not args.user:
        raise UsageError("give --user USER_ID, or --input FILE to assign every row of a file")
    check_segment(experiment, args.segment)
    from worker.service.handling import handle
    from worker.service.ports import Delivery

    body: dict[str, object] = {"user_id": args.user, "experiment_id": args.experiment}
    if args.segment:
        body["segment"] = args.segment
    if args.context is not None:
        body["context"] = args.context
    # Decided as the worker decides a request enqueued at --at (the decision time), by the same code.
    delivery = Delivery(
        body=json.dumps(body).encode(), message_id=f"cli:{args.experiment}:{args.user}", enqueued_time=at
    )
    try:
        (event,) = handle(delivery, registry).events
    except PermanentError as exc:
        raise UsageError(f"{exc.reason}: {exc.description}") from None
    print(event.model_dump_json(indent=2))
    return EXIT_OK


def _assign_file(args: argparse.Namespace, experiment: Experiment, at: datetime) -> int:
    from worker.service.batch import BadRow, assign_file, detect_format
    from worker.service.inputfile import Problem, decoded_lines

    source = Path(args.input)
    check_input(source)
    in_format = detect_format(source, args.format)
    out_path = check_output(Path(args.output)) if args.output and args.output != "-" else None
    out_format = args.output_format or (detect_format(out_path, None) if out_path else "jsonl")
    bad: list[Problem] = []
    with ExitStack() as stack:
        binary = stack.enter_context(source.open("rb"))
        out: IO[str] = stack.enter_context(open_output(out_path)) if out_path else sys.stdout
        progress = _progress_bar(stack, binary, source)
        result = assign_file(
            decoded_lines(binary, bad),
            out,
            experiment,
            in_format=in_format,
            out_format=out_format,
            source=str(source),
            at=at,
            progress=progress,
        )
    result.bad_rows[:0] = [BadRow(line, problem) for line, problem in bad]
    for row in sorted(result.bad_rows, key=lambda r: r.line):
        print(f"{source}: line {row.line}: skipped: {row.problem}", file=sys.stderr)
    summary = ", ".join(f"{v}={n}" for v, n in sorted(result.counts.items()))
    print(
        f"assigned {counted(result.assigned, 'row')} ({summary or 'none'}); skipped {len(result.bad_rows)}",
        file=sys.stderr,
    )
    if result.unsplit_segments:
        # Legitimate (they get the experiment's split, as on the queue), but a typo in a segment column looks the same.
        seen = ", ".join(f"{segment} {n}" for segment, n in sorted(result.unsplit_segments.items()))
        print(
            f"note: {counted(result.unsplit_segments.total(), 'row')} had a segment with no split of its own ({seen});"
            f" they got the experiment's split. {experiment.config.id}'s segments:"
            f" {', '.join(sorted(experiment.config.segments))}",
            file=sys.stderr,
        )
    print(_membership(result.reasons, at, given=args.at is not None), file=sys.stderr)
    return EXIT_PARTIAL if result.bad_rows else EXIT_OK


def _membership(reasons: Counter[str], at: datetime, *, given: bool) -> str:
    """How many rows are in the experiment, the others by reason, and the one decision time of the file."""
    inside = reasons.get("bucketed", 0)
    outside = sorted(((n, r) for r, n in reasons.items() if r != "bucketed"), key=lambda item: (-item[0], item[1]))
    others = f"; outside it: {', '.join(f'{reason} {n}' for n, reason in outside)}" if outside else ""
    when = "--at" if given else "the start of the run"
    return f"in the experiment: {inside}{others}; every row decided at {utc_iso(at)} ({when}, one time for the file)"


def _progress_bar(stack: ExitStack, binary: IO[bytes], source: Path) -> Callable[[int], None] | None:
    """A bar on a terminal for inputs over ~1 MB; None otherwise (no noise in pipes and CI)."""
    size = source.stat().st_size
    if not sys.stderr.isatty() or size < 1_000_000:
        return None
    from worker.cli.render.progress import file_progress

    return file_progress(stack, binary, size, sys.stderr, "assigning")


def cmd_validate_config(args: argparse.Namespace) -> int:
    """Check a registry file (and, with ``--against``, the edit from another); exit 2 on any problem."""
    registry = ExperimentRegistry.load(args.file)
    if args.against:
        return _compare(args, registry)
    for experiment in registry:
        print(f"ok  {describe_experiment(experiment)}")
    print(f"{args.file}: {counted(len(registry), 'experiment')}, {'valid' if len(registry) == 1 else 'all valid'}")
    return EXIT_OK


def describe_experiment(experiment: Experiment) -> str:
    """One line: id, version, seed, split, and each allocation feature the experiment uses."""
    config = experiment.config
    split = ", ".join(f"{k}={v}" for k, v in sorted(config.split.items()))
    parts = [f"{config.id} v{config.version} seed={config.seed!r} split {split}"]
    if config.segments:
        parts.append(counted(len(config.segments), "segment split"))
    if config.status != "running":
        parts.append(f"status {config.status}" + (f" ({config.launched})" if config.launched else ""))
    if config.start_at or config.end_at:
        window = (
            utc_iso(config.start_at) if config.start_at else "-",
            utc_iso(config.end_at) if config.end_at else "-",
        )
        parts.append(f"from {window[0]} until {window[1]}")
    if config.targeting:
        parts.append(f"targeting on {', '.join(sorted(config.targeting))}")
    if config.holdouts:
        parts.append(f"holdouts {', '.join(config.holdouts)}")
    if config.layer:
        low, high = config.layer.range
        parts.append(f"layer {config.layer.id} [{low}, {high})")
    if config.coverage < 1:
        parts.append(f"coverage {config.coverage:g}")
    if config.overrides:
        parts.append(counted(len(config.overrides), "override"))
    if not experiment.plain or config.control is not None:
        parts.append(f"control {experiment.allocation.control}")
    return "; ".join(parts) + f"  [config {experiment.allocation.config_version}]"


def _compare(args: argparse.Namespace, new: ExperimentRegistry) -> int:
    """``--against OLD``: per experiment, what changed and the share of users who would move; 2 when refused."""
    from worker.domain.allocation import changes
    from worker.domain.allocation.changes import SAMPLE

    old = ExperimentRegistry.load(args.against)
    at = args.at or datetime.now(UTC)
    report = changes(old.allocation, new.allocation, at=at)
    print(f"{args.file} against {args.against}, decided at {utc_iso(at)}:")
    for change in report.experiments:
        print(f"{change.kind:<10} {change.experiment_id}")
        for line in change.changed:
            print(f"{'':<11}{line}")
        if change.kind == "changed" and change.moved_share is not None:
            segments = "".join(f"; segment {s}: {share:.2%}" for s, share in change.segment_moved_share.items())
            print(f"{'':<11}users whose variant or exposure would change: {change.moved_share:.2%}{segments}")
        for reason in change.refusals:
            print(f"{'':<11}REFUSED: {reason}")
    print(
        f"(estimated on {SAMPLE:,} synthetic users with no context: targeting is taken as matched, "
        "since requests' contexts are not in the file)"
    )
    if report.refused:
        print(f"{args.file}: the worker would refuse this reload over {args.against} and keep running the old file")
        raise ConfigurationError(report.refusal_message(args.file))
    print(f"{args.file}: a safe edit of {args.against}; a running worker would reload it")
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Register ``assign`` and ``validate-config``."""
    assign = commands.add_parser(
        "assign",
        help="assign one user, or every row of a file",
        formatter_class=formatter,
        description="Assign users to an experiment's variants with the deterministic MD5 rule.",
        epilog=(
            "examples:\n"
            "  ab-worker assign --experiment exp_001 --user U123\n"
            "  ab-worker assign --experiment exp_001 --user U456 --split A=0.7,B=0.3\n"
            "  ab-worker assign --experiment exp_001 --config deploy/experiments.yaml --user U123\n"
            "  ab-worker assign --experiment exp_001 --input users.csv --output assigned.csv\n\n"
            "  ab-worker assign --experiment exp_personalization_001 --config deploy/experiments.yaml \\\n"
            "      --user U123 --segment high_intent\n\n"
            "--segment must name one of the experiment's per-segment splits, or the command stops with\n"
            "status 2 and lists them: a typo would otherwise print an assignment from the default split.\n"
            "(On the queue any other segment is legitimate and gets the experiment's split: leave out\n"
            "--segment for that assignment.) An experiment without per-segment splits takes any segment.\n"
            "  ab-worker assign --experiment exp_cta --config experiments.yaml --user U42 \\\n"
            '      --context \'{"country": "US"}\' --at 2026-12-07T12:00:00Z\n\n'
            "--input takes JSON lines (user_id, optionally segment and a context object) or CSV with a\n"
            "user_id column, optionally segment, and the other columns as the context: a cell the\n"
            "experiment's targeting compares with numbers is read as a number (18, -2.5), one compared\n"
            "with true/false as a boolean, every other cell as text. Every row gets in_experiment and\n"
            "reason, and every row is decided at one time: --at, else when the run starts. Rows whose\n"
            "segment has no split of its own get the experiment's split, counted in a note on stderr.\n"
            "Bad rows are reported with their line number and skipped; exit status 1 when any were."
        ),
    )
    assign.add_argument("--experiment", required=True, help="experiment id")
    assign.add_argument("--user", help="user id to assign (prints the event JSON)")
    assign.add_argument(
        "--segment",
        help="segment, for experiments with per-segment splits (it must be one of them: see below)",
    )
    add_decision_arguments(
        assign,
        context_help="the request's context (targeting reads it); with --user",
        at_help="decision time (default now): an ISO 8601 time, UTC unless it says otherwise, or a duration back"
        " from now; with --input, one time for every row",
    )
    assign.add_argument("--split", help="variant shares, e.g. A=0.5,B=0.5 (default); not with --config")
    assign.add_argument("--seed", help="hash seed (default echovoice); not with --config")
    assign.add_argument("--config", help="experiments file to take the split, seed and version from")
    assign.add_argument("--input", help="JSON-lines or CSV file of users to assign")
    assign.add_argument("--format", choices=["csv", "jsonl"], help="input format (default: from extension)")
    assign.add_argument("--output", help="output file (default stdout); format from its extension")
    assign.add_argument("--output-format", choices=["csv", "jsonl"], help="output format (default jsonl)")
    assign.set_defaults(func=cmd_assign)

    validate = commands.add_parser(
        "validate-config",
        help="check an experiments file and list its experiments",
        description=(
            "Validate an experiments registry file (YAML or JSON).\n"
            "Exit 0 when valid; 2 with every problem listed (file, experiment, field) otherwise.\n"
            "With --against OLD: also compare it with the file running now (docs/allocation.md, safe edits):\n"
            "per experiment what changed and the share of users whose variant or exposure would change;\n"
            "exit 2 when a running worker would refuse the reload (change the experiment's version)."
        ),
        epilog=(
            "examples:\n"
            "  ab-worker validate-config deploy/experiments.yaml\n"
            "  ab-worker validate-config new.yaml --against deploy/experiments.yaml"
        ),
        formatter_class=formatter,
    )
    validate.add_argument("file", help="registry file, e.g. deploy/experiments.yaml")
    validate.add_argument(
        "--against",
        metavar="OLD",
        help="the file running now: show what changes per experiment, and exit 2 where the reload would be refused",
    )
    validate.add_argument(
        "--at",
        type=moment(lambda: datetime.now(UTC)),
        metavar="ISO",
        help="with --against: the decision time of the estimate (default now; naive means UTC)",
    )
    validate.set_defaults(func=cmd_validate_config)
