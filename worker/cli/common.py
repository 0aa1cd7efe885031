"""What every command shares: exit statuses, the help formatter, argument types and settings."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from worker.domain.errors import ConfigurationError, UsageError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def formatter(prog: str) -> argparse.HelpFormatter:
    """The help layout of every command: descriptions and epilogs printed as written."""
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


def load_settings() -> Any:
    """The worker settings from ``AB_WORKER_*``; a bad value is a :class:`ConfigurationError`."""
    from worker.service.settings import WorkerSettings

    try:
        return WorkerSettings()
    except ValidationError as exc:
        raise ConfigurationError(settings_problem(exc)) from None


def settings_problem(exc: ValidationError) -> str:
    """One line per bad ``AB_WORKER_*`` variable."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        name = "_".join(str(p) for p in error["loc"]).upper()
        name = name if name.startswith("AB_WORKER_") else "AB_WORKER_" + name  # aliases carry the prefix
        lines.append(f"environment variable {name}: {error['msg']}")
    return "\n".join(lines)


def servicebus_client() -> Any:
    """A Service Bus client and the settings it came from; a usage error when none is configured."""
    from worker.service import bootstrap as compose

    settings = load_settings()
    if settings.servicebus_connection_string is None and settings.servicebus_namespace is None:
        raise UsageError(
            "no Service Bus: set AB_WORKER_SERVICEBUS_CONNECTION_STRING (e.g. the one `ab-worker broker` prints) "
            "or AB_WORKER_SERVICEBUS_NAMESPACE"
        )
    return compose.servicebus_client(settings), settings
