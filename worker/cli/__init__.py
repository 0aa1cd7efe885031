"""``ab-worker``: the command line, and the composition root (the one place that picks adapters).

Exit statuses: 0 success; 1 finished but some input was skipped or failed; 2 bad usage, bad
configuration or unreadable input (the message names the file, row or field).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from worker.cli import assign as assign_cli
from worker.cli import broker as broker_cli
from worker.cli import cohort as cohort_cli
from worker.cli import dlq as dlq_cli
from worker.cli import report as report_cli
from worker.cli import run as run_cli
from worker.cli.common import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, formatter
from worker.domain.errors import ConfigurationError, SplitRatioError, UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(
        prog="ab-worker",
        formatter_class=formatter,
        description=(
            "Experiment-assignment worker: deterministic MD5 bucketing of users into variants,\n"
            "served from an Azure Service Bus queue, with events, spans and Kusto rows."
        ),
        epilog="Run 'ab-worker COMMAND --help' for each command's options and examples.",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="DEBUG, INFO (default), ... (or AB_WORKER_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    assign_cli.add_commands(commands)
    run_cli.add_commands(commands)
    cohort_cli.add_commands(commands)
    broker_cli.add_commands(commands)
    dlq_cli.add_commands(commands)
    report_cli.add_commands(commands)
    _accept_log_level_anywhere(commands)
    return parser


def _accept_log_level_anywhere(commands: Any) -> None:
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
    """Entry point of ``ab-worker`` and ``python -m worker``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _configure_logging(_log_level(args))
    except ConfigurationError as exc:
        print(f"ab-worker {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
