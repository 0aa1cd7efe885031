"""``ab-worker run``: the message pump over a file, the embedded broker or Service Bus."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pydantic import SecretStr

from worker import bootstrap as compose
from worker.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    ExitStatus,
    Subcommands,
    UnreachableError,
    check_input,
    check_output,
    formatter,
    integer,
    listen_error,
    open_output,
    port,
    print_err,
)
from worker.domain.errors import UsageError
from worker.domain.plural import counted
from worker.domain.registry import ExperimentRegistry
from worker.service.observe import OutageLimit, PumpObserver, PumpStats
from worker.service.ports import ExperimentSource
from worker.service.settings import WorkerSettings

if TYPE_CHECKING:
    from adapters.experiments import ReloadingRegistry
    from adapters.servicebus import Client as ServiceBusClient

log = logging.getLogger(__name__)

#: What ``run`` offers instead of a configured Service Bus.
ALTERNATIVES = ("--local for the embedded broker", "--input FILE")

#: ``run --drain`` ends with status 5 once a dependency has failed for this many Service Bus try
#: timeouts (``AB_WORKER_SERVICEBUS_TRY_TIMEOUT``) since its first failure: a drain is a job that must end.
DRAIN_GIVE_UP_TRIES = 3


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pump: over a file (``--input``), the embedded broker (``--local``) or Service Bus."""
    settings = compose.environment_settings().with_overrides(experiments_file=args.config, max_batch=args.max_batch)
    for output in (args.rows, args.dead_letters):
        if output:
            check_output(Path(output))
    # Before anything is appended: --rows adds to what is there, and says so when something was.
    rows_held = bool(args.rows) and _holds_data(Path(args.rows))
    if args.processes > 1:
        from worker.cli.supervise import run_supervised

        compose.experiments(settings)  # refuse a missing or broken experiments file here, not in every child
        return run_supervised(args, settings, str(settings.experiments_file), args.processes)
    registry = compose.experiments(settings)
    if args.input:
        if args.local or args.demo:
            raise UsageError("--input reads requests from a file; it cannot be combined with --local or --demo")
        return _run_file(args, settings, registry, rows_held)
    return _run_broker(args, settings, registry, rows_held)


def _run_broker(
    args: argparse.Namespace, settings: WorkerSettings, registry: ReloadingRegistry, rows_held: bool
) -> int:
    """``run`` on Service Bus or the embedded broker (``--local``), with the demo (``--demo``) if asked."""
    # The drain deadline also covers closing the clients and flushing telemetry: its guard is left last.
    with ExitStack() as guard, ExitStack() as stack:
        # An idle worker asks for the registry rarely: check the file on the interval all the same.
        stack.enter_context(registry.watching())
        if args.local:
            settings = _start_local_broker(args, settings, stack)
        client = compose.servicebus_client(settings, ALTERNATIVES)
        stack.callback(client.close)
        tracer_provider, meter_provider = stack.enter_context(compose.telemetry(settings))
        viewer = _start_demo(settings, registry(), client, stack) if args.demo else None
        # A lambda: the pump it stops is built next, with the limit among its observers.
        limit = OutageLimit(DRAIN_GIVE_UP_TRIES * settings.servicebus_try_timeout, lambda: pump.stop())  # noqa: PLW0108
        observers: list[PumpObserver] = [limit] if args.drain else []
        if args.dead_letters:
            observers.append(compose.dead_letter_copies(stack.enter_context(open_output(Path(args.dead_letters)))))
        pump = compose.bootstrap(
            settings,
            registry=registry,
            client=client,
            rows_path=args.rows,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            observers=observers,
        )
        received = guard.enter_context(compose.stop_on_signals(pump, settings.drain_deadline))
        compose.start_health_server(settings, pump.health, stack)
        print_err(f"worker running on queue {settings.queue_name!r} → topic {settings.topic_name!r}")
        stats = pump.run(idle_exit=max(3.0, 2 * settings.max_wait) if args.drain else None)
        if viewer is not None:
            viewer.finish(stats, registry())
    if signal.SIGINT in received:
        return ExitStatus.INTERRUPTED
    status = _report_run(stats, dead_letters_are_failures=False)
    if limit.outage is not None:
        raise UnreachableError(_gave_up(limit))
    if rows_held:
        _say_rows_appended(args.rows)
    if viewer is not None:
        from worker.cli.demo import next_steps

        dead = sum(stats.dead_letters.values())
        print(next_steps(args.rows, args.dead_letters, dead, broker_kept=not args.local), flush=True)
    return status


def _start_local_broker(args: argparse.Namespace, settings: WorkerSettings, stack: ExitStack) -> WorkerSettings:
    """``--local``: the embedded broker, stopped with ``stack``; the settings that point at it."""
    try:
        broker = stack.enter_context(compose.local_broker(args.broker_port))
    except OSError as exc:
        raise listen_error(exc, f"127.0.0.1:{args.broker_port}", "--broker-port") from None
    print_err(f"embedded Service Bus broker listening on 127.0.0.1:{broker.port}")
    return settings.with_overrides(servicebus_connection_string=SecretStr(broker.connection_string))


def _say_rows_appended(rows: str) -> None:
    print_err(f"rows appended to {rows}, which held rows from before: a report over it counts those too")


def _holds_data(path: Path) -> bool:
    """Whether ``path`` is a file with something in it (``--rows`` appends to it)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _run_file(args: argparse.Namespace, settings: WorkerSettings, registry: ExperimentSource, rows_held: bool) -> int:
    """``run --input``: requests from a JSON-lines file, events to ``--output`` (or stdout)."""
    requests = check_input(Path(args.input))
    with ExitStack() as stack:
        events: IO[str] = (
            stack.enter_context(open_output(Path(args.output))) if args.output and args.output != "-" else sys.stdout
        )
        dead: IO[str] = stack.enter_context(open_output(Path(args.dead_letters))) if args.dead_letters else sys.stderr
        source, publisher, sink = compose.file_ports(settings, requests, events, dead, args.rows)
        # Standard output may be the events stream: console telemetry goes to standard error here.
        tracer_provider, meter_provider = stack.enter_context(compose.telemetry(settings, console_out=sys.stderr))
        pump = compose.bootstrap(
            settings,
            registry=registry,
            source=source,
            publisher=publisher,
            sink=sink,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        with compose.stop_on_signals(pump, settings.drain_deadline) as received:
            stats = pump.run(idle_exit=0.0)
    if signal.SIGINT in received:
        return ExitStatus.INTERRUPTED
    status = _report_run(stats)
    if rows_held:
        _say_rows_appended(args.rows)
    return status


def _start_demo(
    settings: WorkerSettings, registry: ExperimentRegistry, client: ServiceBusClient, stack: ExitStack
) -> _EventViewer:
    from adapters.servicebus import send_requests
    from worker.cli.demo import POISONED, demo_requests

    bodies = demo_requests(registry)
    sent = send_requests(client, settings.queue_name, bodies)
    print_err(f"demo: published {counted(sent, 'request')} ({POISONED} of them deliberately malformed or unknown)")
    viewer = _EventViewer(client, settings.topic_name)
    viewer.start()
    stack.callback(viewer.stop)
    return viewer


class _EventViewer:
    """Prints the first events as they arrive on the topic's ``all`` subscription, then a summary."""

    SHOW = 12

    def __init__(self, client: ServiceBusClient, topic: str) -> None:
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
        # Only a bucketed user has a bucket; any other answer names the step that decided it.
        why = f"bucket {event['hash_value']:.6f}" if event.get("hash_value") is not None else event.get("reason")
        print(
            f"event  {event['user_id']:<8} {event['experiment_id']}{segment} → {event['variant_id']}"
            f"  ({why}, event_id {event['event_id'][:8]}…, context {event['context']})",
            flush=True,
        )
        if self.shown == self.SHOW:
            print("…", flush=True)

    def finish(self, stats: PumpStats, registry: ExperimentRegistry) -> None:
        from worker.cli.demo import summary_table

        # Every event the run published comes back (the demo's broker is fresh), however slowly.
        self._tail.stop(expect=sum(stats.assignments.values()), timeout=30.0)
        print(f"\n{counted(self._tail.received, 'event')} read back from subscription 'all'\n", flush=True)
        print(summary_table(stats.assignments, stats.dead_letters, registry, stats.outside), flush=True)


def _gave_up(limit: OutageLimit) -> str:
    """Why ``run --drain`` ended early: what was down, for how long, the bound, and the last error."""
    assert limit.outage is not None
    outage = limit.outage
    return (
        f"the {outage.dependency} could not be reached: every attempt failed for {outage.seconds:.0f} s, and --drain"
        f" gives up after {limit.limit:g} s ({DRAIN_GIVE_UP_TRIES} x AB_WORKER_SERVICEBUS_TRY_TIMEOUT); last error:"
        f" {outage.error}"
    )


def _report_run(stats: PumpStats, dead_letters_are_failures: bool = True) -> int:
    dead = sum(stats.dead_letters.values())
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(stats.dead_letters.items()))
    print(
        f"processed {counted(stats.received, 'request')}: {stats.completed} assigned, {dead} dead-lettered"
        + (f" ({reasons})" if dead else "")
        + (f", {stats.abandoned} not settled" if stats.abandoned else ""),
        file=sys.stderr,
    )
    if stats.abandoned or (dead and dead_letters_are_failures):
        return EXIT_PARTIAL
    return EXIT_OK


def processes(text: str) -> int:
    """An argument type: ``auto`` (one per core this process may use) or a whole number from 1 to 64."""
    from worker.service.supervisor import process_count

    try:
        return process_count(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from 1 to 64, or auto") from None


def add_commands(commands: Subcommands) -> None:
    """Register ``run``."""
    run = commands.add_parser(
        "run",
        help="run the worker (the message pump)",
        formatter_class=formatter,
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
            "Settings come from AB_WORKER_* environment variables (see docs/configuration.md); flags override them.\n"
            "SIGTERM or Ctrl-C: stop receiving, finish and settle the in-flight batch, flush, then exit 0\n"
            "(SIGTERM) or 130 (Ctrl-C); what an outage holds is abandoned for another replica; past\n"
            "AB_WORKER_DRAIN_DEADLINE the process exits (1)."
        ),
    )
    run.add_argument("--config", help="experiments file (or AB_WORKER_EXPERIMENTS_FILE)")
    run.add_argument("--local", action="store_true", help="start the embedded Service Bus broker and use it")
    run.add_argument("--broker-port", type=port, default=0, help="port of the embedded broker (default: any free)")
    run.add_argument("--demo", action="store_true", help="publish realistic requests first and show the events")
    run.add_argument("--drain", action="store_true", help="exit once the queue has stayed empty for a few seconds")
    run.add_argument("--input", help="JSON-lines file of requests (instead of a broker)")
    run.add_argument("--output", help="where events go with --input (default stdout)")
    run.add_argument(
        "--rows",
        help="append Kusto-shaped rows to this JSON-lines file (when Kusto is not configured); it says when\n"
        "the file held rows from before",
    )
    run.add_argument(
        "--dead-letters",
        metavar="FILE",
        help="write each dead-lettered request to FILE (replaced), as dlq export does; with --input the\n"
        "default is stderr, on a broker the dead-letter queue keeps them too",
    )
    run.add_argument("--max-batch", type=integer(1, 5000), help="messages per batch (AB_WORKER_MAX_BATCH, default 100)")
    run.add_argument(
        "--processes",
        type=processes,
        default=1,
        help="pump processes under one supervisor: a number, or auto for one per core (default 1); with --rows,\n"
        "process i writes FILE-i.jsonl",
    )
    run.set_defaults(func=cmd_run)
