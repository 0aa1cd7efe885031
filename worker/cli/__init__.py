"""``ab-worker``: the command line, and the composition root (the one place that picks adapters).

Exit statuses: 0 success; 1 finished but some input was skipped or failed; 2 bad usage, bad
configuration or unreadable input (the message names the file, row or field).
"""

from __future__ import annotations

import argparse
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

from pydantic import SecretStr, ValidationError

from worker.cli import cohort as cohort_cli
from worker.cli import ops as ops_cli
from worker.cli import report as report_cli
from worker.domain.errors import ConfigurationError, PermanentError, SplitRatioError, UsageError
from worker.domain.registry import ExperimentRegistry, ReloadingRegistry
from worker.service import bootstrap as compose

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("ab_worker")


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
    from worker.service.handling import handle
    from worker.service.ports import Delivery

    body: dict[str, Any] = {"user_id": args.user, "experiment_id": args.experiment}
    if args.segment:
        body["segment"] = args.segment
    delivery = Delivery(
        body=json.dumps(body).encode(),
        message_id=f"cli:{args.experiment}:{args.user}",
        enqueued_time=datetime.now(UTC),
    )
    try:
        (event,) = handle(delivery, registry).events
    except PermanentError as exc:
        raise UsageError(f"{exc.reason}: {exc.description}") from None
    print(event.model_dump_json(indent=2))
    return EXIT_OK


def _assign_file(args: argparse.Namespace, experiment: Any) -> int:
    from worker.service.batch import assign_file, decoded_lines, detect_format

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


def _settings() -> Any:
    from worker.service.settings import WorkerSettings

    try:
        return WorkerSettings()
    except ValidationError as exc:
        raise ConfigurationError(_settings_problem(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pump: over a file (``--input``), the embedded broker (``--local``) or Service Bus."""
    from worker.service.pump import Pump

    settings = _settings()
    experiments_file = args.config or settings.experiments_file
    if not experiments_file:
        raise UsageError("no experiments: pass --config FILE or set AB_WORKER_EXPERIMENTS_FILE")
    registry = ReloadingRegistry(experiments_file, interval=settings.reload_interval)
    config = compose.pump_config(settings, args.max_batch)
    if args.input:
        if args.local or args.demo:
            raise UsageError("--input reads requests from a file; it cannot be combined with --local or --demo")
        with ExitStack() as stack:
            source, publisher, sink = _file_ports(args, stack)
            pump = Pump(source, publisher, sink, registry.current, config=config)
            _stop_on_signals(pump)
            stats = pump.run(idle_exit=0.0)
        return _report_run(stats)
    with ExitStack() as stack:
        if args.local:
            broker = stack.enter_context(compose.local_broker(args.broker_port))
            settings.servicebus_connection_string = SecretStr(broker.connection_string)
            compose.print_err(f"embedded Service Bus broker listening on 127.0.0.1:{broker.port}")
        elif settings.servicebus_connection_string is None and settings.servicebus_namespace is None:
            raise UsageError(
                "no Service Bus: set AB_WORKER_SERVICEBUS_CONNECTION_STRING or AB_WORKER_SERVICEBUS_NAMESPACE, "
                "or use --local for the embedded broker, or --input FILE"
            )
        tracer_provider, meter_provider = stack.enter_context(compose.telemetry(settings))
        ports = compose.servicebus_ports(settings, args.rows)
        viewer = None
        if args.demo:
            viewer = _start_demo(settings, registry.current(), ports.client, stack)
        pump = Pump(
            ports.source,
            ports.publisher,
            ports.sink,
            registry.current,
            config=config,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        _stop_on_signals(pump)
        compose.start_health_server(settings.health_port, pump.health, stack)
        compose.print_err(f"worker running on queue {settings.queue_name!r} → topic {settings.topic_name!r}")
        stats = pump.run(idle_exit=max(3.0, 2 * settings.max_wait) if args.drain else None)
        if viewer is not None:
            viewer.finish(stats)
        ports.client.close()
    return _report_run(stats, dead_letters_are_failures=False)


def _start_demo(settings: Any, registry: ExperimentRegistry, client: Any, stack: ExitStack) -> Any:
    from adapters.servicebus import send_requests
    from worker.cli.demo import demo_requests

    bodies = demo_requests(registry)
    sent = send_requests(client, settings.queue_name, bodies)
    compose.print_err(f"demo: published {sent} requests ({sent - 500} of them deliberately malformed or unknown)")
    viewer = _EventViewer(client, settings.topic_name)
    viewer.start()
    stack.callback(viewer.stop)
    return viewer


class _EventViewer:
    """Prints the first events as they arrive on the topic's ``all`` subscription, then a summary."""

    SHOW = 12

    def __init__(self, client: Any, topic: str) -> None:
        from adapters.servicebus import SubscriptionTail

        self.shown = 0
        self._tail = SubscriptionTail(client, topic, "all", self._on_event)

    def start(self) -> None:
        self._tail.start()

    def stop(self) -> None:
        self._tail.stop()

    def _on_event(self, body: bytes) -> None:
        if self.shown >= self.SHOW:
            return
        self.shown += 1
        event = json.loads(body)
        segment = f" [{event['segment']}]" if event.get("segment") else ""
        print(
            f"event  {event['user_id']:<8} {event['experiment_id']}{segment} → {event['variant_id']}"
            f"  (bucket {event['hash_value']:.6f}, event_id {event['event_id'][:8]}…, context {event['context']})",
            flush=True,
        )
        if self.shown == self.SHOW:
            print("…", flush=True)

    def finish(self, stats: Any) -> None:
        from worker.cli.demo import summary_table

        self._tail.stop(drain_seconds=1.0)
        print(f"\n{self._tail.received} events read back from subscription 'all'\n", flush=True)
        print(summary_table(stats.assignments, stats.dead_letters), flush=True)


def _report_run(stats: Any, dead_letters_are_failures: bool = True) -> int:
    dead = sum(stats.dead_letters.values())
    print(
        f"processed {stats.received} requests: {stats.completed} assigned, {dead} dead-lettered"
        + (f" ({dict(stats.dead_letters)})" if dead else "")
        + (f", {stats.abandoned} not settled" if stats.abandoned else ""),
        file=sys.stderr,
    )
    if stats.abandoned or (dead and dead_letters_are_failures):
        return EXIT_PARTIAL
    return EXIT_OK


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
    cohort_cli.add_commands(commands)
    ops_cli.add_commands(commands)
    report_cli.add_commands(commands)
    return parser


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
            "Against Service Bus (AB_WORKER_SERVICEBUS_*), the embedded local broker (--local),\n"
            "or a JSON-lines file of requests (--input)."
        ),
        epilog=(
            "examples:\n"
            "  ab-worker run --config deploy/experiments.yaml --local --demo --drain\n"
            "  AB_WORKER_SERVICEBUS_NAMESPACE=myns ab-worker run --config experiments.yaml\n"
            "  ab-worker run --config deploy/experiments.yaml --input requests.jsonl --output events.jsonl\n\n"
            "Settings come from AB_WORKER_* environment variables (see the README); flags override them.\n"
            "SIGTERM or Ctrl-C: stop receiving, finish and settle the in-flight batch, flush, exit 0."
        ),
    )
    run.add_argument("--config", help="experiments file (or AB_WORKER_EXPERIMENTS_FILE)")
    run.add_argument("--local", action="store_true", help="start the embedded Service Bus broker and use it")
    run.add_argument("--broker-port", type=int, default=0, help="port of the embedded broker (default: any free)")
    run.add_argument("--demo", action="store_true", help="publish realistic requests first and show the events")
    run.add_argument("--drain", action="store_true", help="exit once the queue has stayed empty for a few seconds")
    run.add_argument("--input", help="JSON-lines file of requests (instead of a broker)")
    run.add_argument("--output", help="where events go with --input (default stdout)")
    run.add_argument("--rows", help="append Kusto-shaped rows to this JSON-lines file (when Kusto is not configured)")
    run.add_argument("--dead-letters", help="with --input: write dead-lettered requests here (default stderr)")
    run.add_argument("--max-batch", type=int, help="messages per batch (AB_WORKER_MAX_BATCH, default 100)")
    run.set_defaults(func=cmd_run)


def _configure_logging(level: str) -> None:
    from worker.service.redaction import install_log_redaction

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The Azure SDKs narrate every link state change at INFO; keep them to warnings unless debugging.
    if level != "DEBUG":
        for noisy in ("azure", "azure.core.pipeline.policies.http_logging_policy", "uamqp", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ab-worker`` and ``python -m worker``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        result: int = args.func(args)
    except (UsageError, ConfigurationError, SplitRatioError) as exc:
        print(f"ab-worker {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        if not _is_azure_error(exc):
            raise
        from worker.service.redaction import redact

        print(f"ab-worker {args.command}: error: Azure call failed: {redact(str(exc))}", file=sys.stderr)
        return EXIT_PARTIAL
    return result


def _is_azure_error(exc: BaseException) -> bool:
    """True for an Azure SDK error (unreachable broker, denied access): reported in one line, no traceback."""
    return any(cls.__module__.startswith("azure.") for cls in type(exc).__mro__)
