"""``ab-worker run --processes N``: the supervisor's command-line side.

The children are ordinary ``ab-worker run`` processes against the same Service Bus (with ``--local``,
the embedded broker this process starts), each with its own connection. With ``--rows FILE`` child
``i`` writes ``FILE`` with ``-i`` before the suffix (``rows-1.jsonl``, ``rows-2.jsonl``): one writer
per file, and ``ab-worker report --rows`` takes them all. ``--dead-letters FILE`` is split the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from worker import bootstrap
from worker.cli.common import EXIT_OK, EXIT_PARTIAL, ExitStatus, UnreachableError, print_err
from worker.domain.errors import UsageError
from worker.domain.plural import counted
from worker.service.settings import WorkerSettings
from worker.service.signals import on_signals
from worker.service.supervisor import Supervisor, SupervisorConfig


def child_rows(path: str, index: int) -> str:
    """``out/rows.jsonl`` → ``out/rows-2.jsonl`` for child 2."""
    rows = Path(path)
    return str(rows.with_name(f"{rows.stem}-{index}{rows.suffix}"))


def child_command(args: argparse.Namespace, experiments_file: str) -> list[str]:
    """The ``ab-worker run`` each child runs: the parent's options, minus the ones the parent keeps."""
    # No --log-level given: the children read AB_WORKER_LOG_LEVEL from the environment they inherit.
    level = ["--log-level", args.log_level] if args.log_level else []
    command = [sys.executable, "-m", "worker", *level, "run", "--config", experiments_file]
    if args.max_batch:
        command += ["--max-batch", str(args.max_batch)]
    if args.drain:
        command.append("--drain")
    return command


def run_supervised(args: argparse.Namespace, settings: WorkerSettings, experiments_file: str, processes: int) -> int:
    """Start the broker if asked, then supervise ``processes`` pump processes until SIGTERM (or drained)."""
    if args.input or args.demo:
        raise UsageError(
            "--processes runs pump processes against Service Bus; it cannot be combined with --input or --demo"
        )
    with ExitStack() as stack:
        env = dict(os.environ)
        if args.local:
            broker = stack.enter_context(bootstrap.local_broker(args.broker_port))
            env["AB_WORKER_SERVICEBUS_CONNECTION_STRING"] = broker.connection_string
            print_err(f"embedded Service Bus broker listening on 127.0.0.1:{broker.port}")
        else:
            bootstrap.require_servicebus(settings, ("--local for the embedded broker",))
        rows, dead_letters = args.rows, args.dead_letters

        def child_args(index: int) -> list[str]:
            own = [("--rows", rows), ("--dead-letters", dead_letters)]
            return [arg for flag, path in own if path for arg in (flag, child_rows(path, index))]

        supervisor = Supervisor(
            SupervisorConfig(
                processes=processes,
                command=child_command(args, experiments_file),
                env=env,
                drain_deadline=settings.drain_deadline,
                liveness_timeout=settings.liveness_timeout,
                child_args=child_args,
                # --drain: a child that gave up on an unreachable dependency ends the run, not restarted for ever.
                give_up_status=ExitStatus.UNREACHABLE if args.drain else None,
            )
        )
        stack.enter_context(on_signals(lambda received: supervisor.stop()))
        bootstrap.start_health_server(settings, supervisor.health, stack)
        print_err(
            f"supervising {counted(processes, 'worker process', 'worker processes')} on queue {settings.queue_name!r}"
            f" → topic {settings.topic_name!r}"
        )
        code = supervisor.run()
    if code == ExitStatus.UNREACHABLE:
        raise UnreachableError(gave_up_message(supervisor.gave_up(), processes))
    return EXIT_OK if code == 0 else EXIT_PARTIAL


def gave_up_message(gave_up: list[tuple[int, str]], processes: int) -> str:
    """Which processes gave up under ``--drain``, and why (the first one's reason: the others' is the same outage)."""
    (first, reason), indexes = gave_up[0], [index for index, _ in gave_up]
    if len(indexes) == 1:
        return f"process {first} of {processes} gave up (--drain): {reason}"
    which = ", ".join(str(index) for index in indexes)
    return f"processes {which} of {processes} gave up (--drain); process {first}: {reason}"
