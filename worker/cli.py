"""``ab-worker``: the command line, and the composition root (the one place that picks adapters).

Exit statuses: 0 success; 1 finished but some input was skipped or failed; 2 bad usage, bad
configuration or unreadable input (the message names the file, row or field).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from pydantic import ValidationError

from worker.errors import ConfigurationError, PermanentError, SplitRatioError, WorkerError
from worker.registry import ExperimentRegistry, ReloadingRegistry

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("ab_worker")


class UsageError(WorkerError):
    """Bad flags or input files; printed without a traceback, exit status 2."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def parse_split(text: str) -> dict[str, float]:
    """``A=0.5,B=0.5`` → ``{"A": 0.5, "B": 0.5}``."""
    split: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--split: expected VARIANT=SHARE pairs like A=0.5,B=0.5; got {part!r}")
        try:
            split[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--split: share of variant {name.strip()!r} is not a number: {value!r}") from None
    return split


# -- assign -------------------------------------------------------------------------------------


def _registry_for(args: argparse.Namespace) -> ExperimentRegistry:
    if args.config:
        if args.split or args.seed:
            raise UsageError("--split and --seed come from the experiment in --config; do not pass both")
        return ExperimentRegistry.load(args.config)
    split = parse_split(args.split) if args.split else {"A": 0.5, "B": 0.5}
    return ExperimentRegistry.single(args.experiment, split, seed=args.seed or "echovoice")


def cmd_assign(args: argparse.Namespace) -> int:
    """Assign one user (prints the event) or every row of ``--input`` (streams results)."""
    registry = _registry_for(args)
    experiment = registry.get(args.experiment)
    if experiment is None:
        raise UsageError(f"experiment {args.experiment!r} is not in {registry.source}")
    if args.input:
        return _assign_file(args, experiment)
    if not args.user:
        raise UsageError("give --user USER_ID, or --input FILE to assign every row of a file")
    from worker.handling import assign, decode_request
    from worker.ports import Delivery

    body: dict[str, Any] = {"user_id": args.user, "experiment_id": args.experiment}
    if args.segment:
        body["segment"] = args.segment
    delivery = Delivery(
        body=json.dumps(body).encode(),
        message_id=f"cli:{args.experiment}:{args.user}",
        enqueued_time=datetime.now(UTC),
    )
    try:
        event = assign(decode_request(delivery), delivery, registry)
    except PermanentError as exc:
        raise UsageError(f"{exc.reason}: {exc.description}") from None
    print(event.model_dump_json(indent=2))
    return EXIT_OK


def _assign_file(args: argparse.Namespace, experiment: Any) -> int:
    from worker.batch import assign_file, decoded_lines, detect_format

    source = Path(args.input)
    if not source.is_file():
        raise UsageError(f"{source}: file not found")
    in_format = detect_format(source, args.format)
    out_path = Path(args.output) if args.output and args.output != "-" else None
    out_format = args.output_format or (detect_format(out_path, None) if out_path else "jsonl")
    bad: list[Any] = []
    with ExitStack() as stack:
        binary = stack.enter_context(source.open("rb"))
        out: IO[str] = stack.enter_context(out_path.open("w", encoding="utf-8", newline="")) if out_path else sys.stdout
        progress = _progress_bar(stack, source)
        try:
            result = assign_file(
                decoded_lines(binary, bad),
                out,
                experiment,
                in_format=in_format,
                out_format=out_format,
                source=str(source),
                progress=progress,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    result.bad_rows[:0] = bad
    for row in sorted(result.bad_rows, key=lambda r: r.line):
        print(f"{source}: line {row.line}: skipped: {row.problem}", file=sys.stderr)
    summary = ", ".join(f"{v}={n}" for v, n in sorted(result.counts.items()))
    print(
        f"assigned {result.assigned} rows ({summary or 'none'}); skipped {len(result.bad_rows)}",
        file=sys.stderr,
    )
    return EXIT_PARTIAL if result.bad_rows else EXIT_OK


def _progress_bar(stack: ExitStack, source: Path) -> Any:
    """A tqdm bar on a terminal for inputs over ~1 MB; None otherwise (no noise in pipes and CI)."""
    if not sys.stderr.isatty() or source.stat().st_size < 1_000_000:
        return None
    from tqdm import tqdm

    bar = stack.enter_context(tqdm(unit=" rows", unit_scale=True, desc="assigning", file=sys.stderr))
    return bar.update


# -- validate-config ----------------------------------------------------------------------------


def cmd_validate_config(args: argparse.Namespace) -> int:
    """Check a registry file; print each problem, exit 2 when there is any."""
    registry = ExperimentRegistry.load(args.file)
    for experiment in registry:
        config = experiment.config
        segments = f", {len(config.segments)} segment overrides" if config.segments else ""
        split = ", ".join(f"{k}={v}" for k, v in sorted(config.split.items()))
        print(f"ok  {config.id} v{config.version} seed={config.seed!r} split {split}{segments}")
    print(f"{args.file}: {len(registry)} experiments, all valid")
    return EXIT_OK


# -- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pump until stopped (or until ``--input`` is exhausted)."""
    from worker.pump import Pump, PumpConfig
    from worker.settings import WorkerSettings

    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        raise ConfigurationError(_settings_problem(exc)) from None
    experiments_file = args.config or settings.experiments_file
    if not experiments_file:
        raise UsageError("no experiments: pass --config FILE or set AB_WORKER_EXPERIMENTS_FILE")
    registry = ReloadingRegistry(experiments_file, interval=settings.reload_interval)
    config = PumpConfig(
        queue_name=settings.queue_name,
        topic_name=settings.topic_name,
        max_batch=args.max_batch or settings.max_batch,
        max_wait=settings.max_wait,
        max_body_bytes=settings.max_body_bytes,
        context_allow_list=frozenset(settings.context_allow_list),
        drain_deadline=settings.drain_deadline,
    )
    if not args.input:
        raise UsageError("ab-worker run needs --input FILE (JSON-lines requests) until a broker is configured")
    with ExitStack() as stack:
        source, publisher, sink = _file_ports(args, stack)
        pump = Pump(source, publisher, sink, registry.current, config=config)
        _stop_on_signals(pump)
        stats = pump.run(idle_exit=0.0)
    dead = sum(stats.dead_letters.values())
    print(
        f"processed {stats.received} requests: {stats.completed} assigned, {dead} dead-lettered"
        + (f" ({dict(stats.dead_letters)})" if dead else "")
        + (f", {stats.abandoned} not settled" if stats.abandoned else ""),
        file=sys.stderr,
    )
    return EXIT_PARTIAL if dead or stats.abandoned else EXIT_OK


def _file_ports(args: argparse.Namespace, stack: ExitStack) -> tuple[Any, Any, Any]:
    from adapters.files import JsonLinesPublisher, JsonLinesSink, JsonLinesSource

    source_path = Path(args.input)
    if not source_path.is_file():
        raise UsageError(f"{source_path}: file not found")
    events_out: IO[str] = (
        stack.enter_context(Path(args.output).open("w", encoding="utf-8"))
        if args.output and args.output != "-"
        else sys.stdout
    )
    dead_out: IO[str] = (
        stack.enter_context(Path(args.dead_letters).open("w", encoding="utf-8")) if args.dead_letters else sys.stderr
    )
    source = JsonLinesSource(source_path, dead_letter_stream=dead_out)
    sink = JsonLinesSink(Path(args.rows) if args.rows else None)
    return source, JsonLinesPublisher(events_out), sink


def _stop_on_signals(pump: Any) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.warning("Received %s: finishing the in-flight batch, then exiting", signal.Signals(signum).name)
        pump.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _settings_problem(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        name = "AB_WORKER_" + "_".join(str(p) for p in error["loc"]).upper()
        lines.append(f"environment variable {name}: {error['msg']}")
    return "\n".join(lines)


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(
        prog="ab-worker",
        formatter_class=_formatter,
        description=(
            "Experiment-assignment worker: deterministic MD5 bucketing of users into variants,\n"
            "served from an Azure Service Bus queue, with events, spans and Kusto rows."
        ),
        epilog="Run 'ab-worker COMMAND --help' for each command's options and examples.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_assign(commands)
    _add_run(commands)
    validate = commands.add_parser(
        "validate-config",
        help="check an experiments file and list its experiments",
        description=(
            "Validate an experiments registry file (YAML or JSON).\n"
            "Exit 0 when valid; 2 with every problem listed (file, experiment, field) otherwise."
        ),
        formatter_class=_formatter,
    )
    validate.add_argument("file", help="registry file, e.g. deploy/experiments.yaml")
    validate.set_defaults(func=cmd_validate_config)
    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands: Any) -> None:
    # Command groups that live in their own modules register themselves here.
    for module_name in ("worker.cohort_cli",):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        module.add_commands(commands)


def _add_assign(commands: Any) -> None:
    assign = commands.add_parser(
        "assign",
        help="assign one user, or every row of a file",
        formatter_class=_formatter,
        description="Assign users to an experiment's variants with the deterministic MD5 rule.",
        epilog=(
            "examples:\n"
            "  ab-worker assign --experiment exp_001 --user U123\n"
            "  ab-worker assign --experiment exp_001 --user U456 --split A=0.7,B=0.3\n"
            "  ab-worker assign --experiment exp_001 --config deploy/experiments.yaml --user U123\n"
            "  ab-worker assign --experiment exp_001 --input users.csv --output assigned.csv\n\n"
            "--input takes JSON lines or CSV with a user_id column (and optionally segment).\n"
            "Bad rows are reported with their line number and skipped; exit status 1 when any were."
        ),
    )
    assign.add_argument("--experiment", required=True, help="experiment id")
    assign.add_argument("--user", help="user id to assign (prints the event JSON)")
    assign.add_argument("--segment", help="segment, for experiments with per-segment splits")
    assign.add_argument("--split", help="variant shares, e.g. A=0.5,B=0.5 (default); not with --config")
    assign.add_argument("--seed", help="hash seed (default echovoice); not with --config")
    assign.add_argument("--config", help="experiments file to take the split, seed and version from")
    assign.add_argument("--input", help="JSON-lines or CSV file of users to assign")
    assign.add_argument("--format", choices=["csv", "jsonl"], help="input format (default: from extension)")
    assign.add_argument("--output", help="output file (default stdout); format from its extension")
    assign.add_argument("--output-format", choices=["csv", "jsonl"], help="output format (default jsonl)")
    assign.set_defaults(func=cmd_assign)


def _add_run(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run the worker (the message pump)",
        formatter_class=_formatter,
        description=(
            "Run the worker: receive assignment requests, publish events, record rows, settle.\n"
            "With --input it reads JSON-lines requests from a file and writes events to --output."
        ),
        epilog=(
            "examples:\n"
            "  ab-worker run --config deploy/experiments.yaml --input requests.jsonl --output events.jsonl\n\n"
            "Settings come from AB_WORKER_* environment variables (see the README); flags override them.\n"
            "SIGTERM or Ctrl-C: stop receiving, finish and settle the in-flight batch, flush, exit 0."
        ),
    )
    run.add_argument("--config", help="experiments file (or AB_WORKER_EXPERIMENTS_FILE)")
    run.add_argument("--input", help="JSON-lines file of requests (instead of a broker)")
    run.add_argument("--output", help="where events go with --input (default stdout)")
    run.add_argument("--rows", help="append Kusto-shaped rows to this JSON-lines file")
    run.add_argument("--dead-letters", help="write dead-lettered requests here (default stderr)")
    run.add_argument("--max-batch", type=int, help="messages per batch (AB_WORKER_MAX_BATCH, default 100)")
    run.set_defaults(func=cmd_run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ab-worker`` and ``python -m worker``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result: int = args.func(args)
    except (UsageError, ConfigurationError, SplitRatioError) as exc:
        print(f"ab-worker {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    return result
