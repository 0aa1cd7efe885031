"""``ab-worker``: the command line, and the composition root (the one place that picks adapters).

Exit statuses: 0 success; 1 finished but some input was skipped or failed; 2 bad usage, bad
configuration or unreadable input (the message names the file, row or field).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from worker.cli import assign as assign_cli
from worker.cli import broker as broker_cli
from worker.cli import cohort as cohort_cli
from worker.cli import dlq as dlq_cli
from worker.cli import report as report_cli
from worker.cli import run as run_cli
from worker.cli.common import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, formatter
from worker.domain.errors import ConfigurationError, SplitRatioError, UsageError


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
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    assign_cli.add_commands(commands)
    run_cli.add_commands(commands)
    cohort_cli.add_commands(commands)
    broker_cli.add_commands(commands)
    dlq_cli.add_commands(commands)
    report_cli.add_commands(commands)
    return parser


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
