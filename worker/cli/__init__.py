"""``ab-worker``: the command line. One parser, one error path (:func:`worker.cli.common.invoke`)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from worker.cli import assign as assign_cli
from worker.cli import broker as broker_cli
from worker.cli import cohort as cohort_cli
from worker.cli import dlq as dlq_cli
from worker.cli import events as events_cli
from worker.cli import explain as explain_cli
from worker.cli import report as report_cli
from worker.cli import run as run_cli
from worker.cli.common import ExitStatus, Parser, Subcommands, exit_status_table, formatter, invoke
from worker.domain.errors import ConfigurationError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ab-assignment-worker")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = Parser(
        prog="ab-worker",
        formatter_class=formatter,
        description=(
            "Experiment-assignment worker: deterministic MD5 bucketing of users into variants,\n"
            "served from an Azure Service Bus queue, with events, spans and Kusto rows."
        ),
        epilog="Run 'ab-worker COMMAND --help' for each command's options and examples.\n\n" + exit_status_table(),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="DEBUG, INFO (default), ... (or AB_WORKER_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    assign_cli.add_commands(commands)
    explain_cli.add_commands(commands)
    run_cli.add_commands(commands)
    cohort_cli.add_commands(commands)
    broker_cli.add_commands(commands)
    dlq_cli.add_commands(commands)
    events_cli.add_commands(commands)
    report_cli.add_commands(commands)
    _accept_log_level_anywhere(commands)
    return parser


def _accept_log_level_anywhere(commands: Subcommands) -> None:
    """``--log-level`` also after the command (``ab-worker run --log-level DEBUG``)."""
    for sub in commands.choices.values():
        # SUPPRESS: a subcommand that was not given the flag must not reset the one given before it.
        sub.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in sub._subparsers._group_actions if sub._subparsers else ():
            if isinstance(action, argparse._SubParsersAction):
                _accept_log_level_anywhere(action)


def _log_level(args: argparse.Namespace) -> str:
    """The flag (before or after the command), else AB_WORKER_LOG_LEVEL, else INFO."""
    if args.log_level:
        return str(args.log_level)
    value = os.environ.get("AB_WORKER_LOG_LEVEL", "INFO").strip().upper()
    if value not in LOG_LEVELS:
        raise ConfigurationError(f"environment variable AB_WORKER_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}")
    return value


def _configure_logging(level: str) -> None:
    from worker.service.redaction import install_log_redaction

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # basicConfig does nothing when a host (or a test runner) already configured handlers: the level still applies.
    logging.getLogger().setLevel(level)
    # The Azure SDKs narrate every link state change at INFO; keep them to warnings unless debugging.
    if level != "DEBUG":
        for noisy in ("azure", "azure.core.pipeline.policies.http_logging_policy", "uamqp", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ab-worker`` and ``python -m worker``: the exit status of the command."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except SystemExit as exc:  # --help, --version, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else ExitStatus.USAGE
    action = next(
        (
            getattr(args, f"{group}_command", None)
            for group in ("dlq", "queue", "events")
            if hasattr(args, f"{group}_command")
        ),
        None,
    )
    command = " ".join(part for part in (args.command, action) if part)

    def run() -> int:
        _configure_logging(_log_level(args))
        status: int = args.func(args)
        return status

    return invoke(command, run)
