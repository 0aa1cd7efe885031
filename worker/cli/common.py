"""What every command shares: the exit statuses, the one error path, argument types and settings.

Every command returns an :class:`ExitStatus` or raises; :func:`invoke` turns whatever it raises into
one line, ``ab-worker <command>: error: <what went wrong>``, and the status for that kind of error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import shutil
import sys
import sysconfig
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, TextIO, TypeAlias

from worker.domain.errors import ConfigurationError, DependencyRefused, TransientError, UsageError, WorkerError
from worker.domain.moments import MomentError, parse_moment
from worker.domain.plural import counted

if TYPE_CHECKING:
    from pydantic import JsonValue

    from adapters.servicebus import Client as ServiceBusClient
    from worker.service.settings import WorkerSettings

log = logging.getLogger("ab_worker")


class ExitStatus(IntEnum):
    """The exit statuses of every ``ab-worker`` command (``docs/cli.md``'s table, and ``--help``)."""

    OK = 0
    PARTIAL = 1
    USAGE = 2
    UNBALANCED = 3
    SRM = 4
    UNREACHABLE = 5
    PORT_IN_USE = 6
    INTERNAL = 70
    INTERRUPTED = 130


EXIT_MEANINGS: dict[ExitStatus, str] = {
    ExitStatus.OK: "success",
    ExitStatus.PARTIAL: "finished, but some input was skipped or not settled (each one is reported)",
    ExitStatus.USAGE: "bad arguments, configuration, environment variable or input/output file; nothing was done",
    ExitStatus.UNBALANCED: "stratify: assignments written, but a balance check failed",
    ExitStatus.SRM: "report: a sample ratio mismatch in at least one experiment",
    ExitStatus.UNREACHABLE: "could not reach Azure or the broker, or it refused the call",
    ExitStatus.PORT_IN_USE: "a port to listen on is already in use",
    ExitStatus.INTERNAL: "internal error (a bug: rerun with --log-level DEBUG and report the traceback)",
    ExitStatus.INTERRUPTED: "interrupted (Ctrl-C, SIGINT)",
}

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = ExitStatus.OK, ExitStatus.PARTIAL, ExitStatus.USAGE


def exit_status_table() -> str:
    """The exit statuses as the help text prints them."""
    return "exit status:\n" + "\n".join(f"  {int(code):>3}  {meaning}" for code, meaning in EXIT_MEANINGS.items())


# --- the one error path -------------------------------------------------------------------------


class PortInUseError(WorkerError):
    """A port to listen on is taken by another process."""


class UnreachableError(WorkerError):
    """Azure or the broker could not be reached, or refused the call."""


def listen_error(exc: OSError, where: str, flag: str) -> WorkerError:
    """The error to raise when listening on ``where`` failed: port in use, or another reason."""
    if exc.errno == errno.EADDRINUSE:
        return PortInUseError(f"{where} is already in use; choose another {flag} (0 picks a free port)")
    return UsageError(f"cannot listen on {where}: {exc.strerror or exc}")


def invoke(command: str, func: Callable[[], int]) -> int:
    """Run a command; whatever it raises becomes one stderr line and that kind of error's status."""
    try:
        return int(func())
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return ExitStatus.OK
    except Exception as exc:
        status, message = describe(exc)
        if status == ExitStatus.INTERNAL:
            log.debug("internal error", exc_info=exc)
        report_error(command, message)
        return status


def report_error(command: str, message: str) -> None:
    """``ab-worker <command>: error: <message>``; a message of several problems lists them below.

    Problems are separated by ``\n`` alone; every control, format or separator character inside one
    (an ESC sequence in a key of the file that is being reported, say) is shown escaped, never sent
    to the terminal, and cannot split a problem in two.
    """
    lines = [_terminal_safe(line) for line in message.strip().split("\n") if line.strip()] or ["failed"]
    head = lines[0] if len(lines) == 1 else f"{counted(len(lines), 'problem')}:"
    body = [] if len(lines) == 1 else [f"  {line}" for line in lines]
    print("\n".join([f"ab-worker {command}: error: {head}", *body]), file=sys.stderr, flush=True)


#: Characters a terminal could act on or that break a line: controls (ESC), format characters (bidi
#: overrides, zero-width), line and paragraph separators, private-use, surrogates and unassigned.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def _terminal_safe(line: str) -> str:
    if line.isprintable():
        return line
    return "".join(_escaped(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in line)


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def describe(exc: BaseException) -> tuple[ExitStatus, str]:
    """The exit status and the one-line message for an error a command raised."""
    from worker.service.redaction import redact

    if isinstance(exc, PortInUseError):
        return ExitStatus.PORT_IN_USE, str(exc)
    if isinstance(exc, UnreachableError):
        return ExitStatus.UNREACHABLE, redact(str(exc))
    # The adapters translate SDK errors into these (adapters/servicebus/errors.py and the Kusto adapters).
    if isinstance(exc, TransientError | DependencyRefused | ConnectionError | TimeoutError):
        # A refusal (an entity that does not exist, or may not be used) is an answer, not an outage.
        refused = isinstance(exc, DependencyRefused)
        what = "Azure or the broker refused the call" if refused else "could not reach Azure or the broker"
        return ExitStatus.UNREACHABLE, redact(f"{what}: {_one_line(exc)}")
    if isinstance(exc, UsageError | ConfigurationError | ValueError):
        return ExitStatus.USAGE, redact(str(exc))
    if isinstance(exc, OSError):
        return _os_error(exc)
    return ExitStatus.INTERNAL, f"internal error: {type(exc).__name__}: {redact(_one_line(exc))}"


def _os_error(exc: OSError) -> tuple[ExitStatus, str]:
    if exc.errno == errno.EADDRINUSE:
        return ExitStatus.PORT_IN_USE, f"port already in use: {exc.strerror}"
    where = f"{exc.filename}: " if exc.filename else ""
    return ExitStatus.USAGE, f"{where}{exc.strerror or exc}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _silence_stdout() -> None:
    # The reader went away (``| head``): point stdout at /dev/null so the interpreter's final
    # flush does not print a second BrokenPipeError.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def runnable_program() -> str:
    """``ab-worker`` as this shell can run it: the bare name when PATH finds this installation, else a path.

    After ``make run`` the command is in ``.venv/bin``, which is on PATH only once the environment is
    activated; a hint that prints a bare ``ab-worker`` would then fail with "command not found".
    """
    script = Path(sysconfig.get_path("scripts")) / "ab-worker"
    found = shutil.which("ab-worker")
    if found is not None and script.exists() and Path(found).resolve() == script.resolve():
        return "ab-worker"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m worker"
    return shlex.quote(_relative_to_cwd(script))


def activation_hint() -> str | None:
    """``source .venv/bin/activate`` for this installation's virtual environment, when it has one."""
    activate = Path(sysconfig.get_path("scripts")) / "activate"
    return f"source {shlex.quote(_relative_to_cwd(activate))}" if activate.exists() else None


def _relative_to_cwd(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_err(message: str) -> None:
    """A line for the operator on stderr."""
    print(message, file=sys.stderr, flush=True)


# --- parsing ------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ab-worker <command>: error: ...`` and where to find help."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitStatus.USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


#: What ``add_subparsers`` returns and each command module's ``add_commands`` fills (a string: argparse's
#: action is generic only in typeshed, not at run time). Any: the host parser's class, ours (:class:`Parser`)
#: or a plain ``ArgumentParser`` of another CLI mounting a command; the action is invariant in it.
Subcommands: TypeAlias = "argparse._SubParsersAction[Any]"


def formatter(prog: str) -> argparse.HelpFormatter:
    """The help layout of every command: descriptions and epilogs printed as written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argument type: a whole number from ``minimum`` (to ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argument type: a finite number above zero (rates, seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


#: Service Bus caps ``MessageId``, ``CorrelationId`` and ``SessionId`` at 128 characters.
BROKER_ID_MAX_CHARS = 128


def broker_id(text: str) -> str:
    """An argument type: a message, correlation or session id (1–128 characters, the id character rule)."""
    from schemas.text import text_problem

    problem = text_problem(text, BROKER_ID_MAX_CHARS)
    if problem is not None:
        # Never echoed: the value may be long, or hold the very characters that make it wrong.
        raise argparse.ArgumentTypeError(f"the value {problem}")
    return text


#: A TCP port to listen on; 0 lets the system pick a free one.
port = integer(0, 65535)


def moment(now: Callable[[], datetime]) -> Callable[[str], datetime]:
    """An argument type: :data:`~worker.domain.moments.MOMENT_FORMS`, resolved against ``now()``."""

    def parse(text: str) -> datetime:
        try:
            return parse_moment(text, now())
        except MomentError as exc:  # its message names the forms, or the range a time fell out of
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def json_context(text: str) -> dict[str, JsonValue]:
    """An argument type: a request context, a JSON object within the wire contract's context limits.

    Refused as the worker would refuse the same context in a request, so the command line never
    answers for a request the worker would dead-letter. The value is never echoed (it may hold
    personal data); the problem names where it is.
    """
    import json

    from schemas.models import NotJsonNumber, finite_json_float, refuse_json_constant, request_context_problem

    try:
        value = json.loads(text, parse_constant=refuse_json_constant, parse_float=finite_json_float)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg} (column {exc.colno})") from None
    except NotJsonNumber as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc} (the worker dead-letters a request holding it)") from None
    except ValueError as exc:  # 1e400, or an integer over Python's 4,300-digit conversion limit
        raise argparse.ArgumentTypeError(f"not JSON the worker accepts: {exc}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("not JSON the worker accepts (nested too deeply)") from None
    problem = request_context_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"the context {problem}")
    return dict(value)


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


# --- files --------------------------------------------------------------------------------------


def check_input(path: Path) -> Path:
    """``path`` if it can be read as a file (a pipe such as /dev/stdin too); else a usage error naming it."""
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not a file")
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: cannot read: permission denied")
    return path


def check_output(path: Path) -> Path:
    """``path`` if a file can be written there; otherwise a :class:`UsageError` naming it.

    Checked before any work (or any connection), so a typo in an output path costs nothing.
    """
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; give a file name")
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"{path}: cannot write: folder {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{path}: cannot write: {parent} is not a folder")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{path}: cannot write: permission denied")
    return path


@contextmanager
def open_output(path: Path, mode: str = "w") -> Iterator[IO[str]]:
    """``path`` opened for text output, errors naming the file as the user typed it."""
    check_output(path)
    try:
        stream = path.open(mode, encoding="utf-8", newline="")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None
    with stream:
        yield stream


def write_files(outputs: Sequence[tuple[Path, Callable[[TextIO], object]]]) -> None:
    """Write every output to a temporary file beside it, then move them all into place.

    Every path is checked before anything is written, and a failure while writing leaves no output
    at all (not the first file without the second); errors name the user's path, never the
    temporary one.
    """
    for path, _ in outputs:
        check_output(path)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in outputs:
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            staged.append((temporary, path))
            try:
                with temporary.open("w", encoding="utf-8", newline="") as stream:
                    write(stream)
            except OSError as exc:
                raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None
        for temporary, path in staged:
            try:
                os.replace(temporary, path)
            except OSError as exc:
                raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)


def read_utf8(path: Path) -> str:
    """The whole of a small text file; a usage error names the file and the first bad byte."""
    check_input(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


# --- settings and clients -----------------------------------------------------------------------


def servicebus_client() -> tuple[ServiceBusClient, WorkerSettings]:
    """A Service Bus client and the settings it came from, from the composition root.

    A usage error when none is configured (:func:`worker.bootstrap.require_servicebus`).
    """
    from worker import bootstrap

    settings = bootstrap.environment_settings()
    return bootstrap.servicebus_client(settings), settings


def servicebus_errors(what: str) -> AbstractContextManager[None]:
    """A context in which Service Bus SDK errors are raised as ours (TransientError / DependencyRefused).

    ``main`` prints those in one line with exit status 1; the classification is the adapter's.
    """
    from adapters.servicebus.errors import translated

    return translated(what)


def add_decision_arguments(parser: argparse.ArgumentParser, *, context_help: str, at_help: str) -> None:
    """``--context`` and ``--at``, read alike by ``assign`` and ``explain``: they decide as the worker would.

    ``--context`` is a request context the worker would accept; ``--at`` the decision time, resolved
    against the clock when the command line is parsed.
    """
    parser.add_argument("--context", type=json_context, metavar="JSON", help=context_help)
    parser.add_argument("--at", type=moment(lambda: datetime.now(UTC)), metavar="ISO|2h", help=at_help)
