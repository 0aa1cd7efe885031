"""Every subcommand through a matrix of bad inputs: the documented exit status, one stderr line, no traceback."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import wait_for
from worker.cli import main
from worker.cli.common import EXIT_MEANINGS, ExitStatus, describe, exit_status_table

CONFIG = "experiments:\n  - {id: e1, split: {A: 0.5, B: 0.5}}\n"
NOT_UTF8 = b"\xff\xfe\x00bad \xc3\x28\n"
USAGE, PARTIAL = ExitStatus.USAGE, ExitStatus.PARTIAL


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Paths for the matrix, and an environment with no Azure settings at all."""
    for name in list(os.environ):
        if name.startswith("AB_WORKER_") or name == "APPLICATIONINSIGHTS_CONNECTION_STRING":
            monkeypatch.delenv(name)
    (tmp_path / "experiments.yaml").write_text(CONFIG, encoding="utf-8")
    (tmp_path / "users.csv").write_text("user_id\nu1\nu2\n", encoding="utf-8")
    (tmp_path / "requests.jsonl").write_text('{"user_id": "u1", "experiment_id": "e1"}\n', encoding="utf-8")
    (tmp_path / "cohort.csv").write_text("customer_id,segment\na,s\nb,s\nc,s\nd,s\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "latin1.yaml").write_bytes(NOT_UTF8)
    (tmp_path / "latin1.csv").write_bytes(NOT_UTF8)
    (tmp_path / "users-latin1.csv").write_bytes(b"user_id\nu1\n" + NOT_UTF8)
    (tmp_path / "latin1.jsonl").write_bytes(NOT_UTF8)
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    return {
        "config": "experiments.yaml",
        "missing": "missing.csv",
        "dir": "folder",
        "no_dir": "no-such-folder/out.csv",
        "under_file": "a-file/out.csv",
    }


PUBLISH = ["--experiment", "e1", "--user", "u"]
#: A connection string for checks made before anything connects (nothing listens on port 9).
LOCAL = {
    "AB_WORKER_SERVICEBUS_CONNECTION_STRING": (
        "Endpoint=sb://127.0.0.1:9;SharedAccessKeyName=k;SharedAccessKey=s;UseDevelopmentEmulator=true"
    )
}
STRATIFY = ["stratify", "cohort.csv", "--experiment", "x", "--arms", "a,b"]
REPORT = ["report", "--rows", "rows.jsonl"]

#: (argv, environment, exit status, a fragment the one stderr line must contain)
MATRIX: list[tuple[list[str], dict[str, str], int, str]] = [
    # assign
    (["assign", "--experiment", "e1", "--input", "{missing}"], {}, USAGE, "missing.csv: file not found"),
    (["assign", "--experiment", "e1", "--input", "{dir}"], {}, USAGE, "folder: is a directory"),
    (["assign", "--experiment", "e1", "--input", "users.csv", "--output", "{no_dir}"], {}, USAGE, "does not exist"),
    (["assign", "--experiment", "e1", "--input", "users.csv", "--output", "{dir}"], {}, USAGE, "is a directory"),
    (["assign", "--experiment", "e1", "--input", "users.csv", "--output", "{under_file}"], {}, USAGE, "not a folder"),
    (["assign", "--experiment", "e1", "--config", "latin1.yaml", "--user", "u"], {}, USAGE, "not UTF-8"),
    (["assign", "--experiment", "e1", "--config", "{missing}", "--user", "u"], {}, USAGE, "file not found"),
    # validate-config
    (["validate-config", "{missing}"], {}, USAGE, "missing.csv: file not found"),
    (["validate-config", "{dir}"], {}, USAGE, "folder"),
    (["validate-config", "latin1.yaml"], {}, USAGE, "not UTF-8"),
    # run
    (["run", "--config", "{missing}", "--input", "requests.jsonl"], {}, USAGE, "file not found"),
    (["run", "--config", "{config}", "--input", "{missing}"], {}, USAGE, "missing.csv: file not found"),
    (["run", "--config", "{config}", "--input", "{dir}"], {}, USAGE, "is a directory"),
    (["run", "--config", "{config}", "--input", "requests.jsonl", "--output", "{no_dir}"], {}, USAGE, "no-such"),
    (["run", "--config", "{config}", "--input", "requests.jsonl", "--rows", "{dir}"], {}, USAGE, "is a directory"),
    (
        ["run", "--config", "{config}", "--input", "requests.jsonl", "--dead-letters", "{under_file}"],
        {},
        USAGE,
        "a-file",
    ),
    (["run", "--config", "{config}", "--max-batch", "0"], {}, USAGE, "argument --max-batch: '0' must be from 1"),
    (["run", "--config", "{config}", "--max-batch", "-1"], {}, USAGE, "argument --max-batch"),
    (
        ["run", "--config", "{config}", "--local", "--broker-port", "99999"],
        {},
        USAGE,
        "'99999' must be from 0 to 65535",
    ),
    (["run", "--config", "{config}"], {"AB_WORKER_SERVICEBUS_CONNECTION_STRING": ""}, USAGE, "no Service Bus"),
    (["run", "--input", "requests.jsonl"], {"AB_WORKER_EXPERIMENTS_FILE": ""}, USAGE, "no experiments"),
    (
        ["run", "--config", "{config}", "--input", "requests.jsonl"],
        {"AB_WORKER_MAX_BATCH": "lots"},
        USAGE,
        "AB_WORKER_MAX_BATCH",
    ),
    # stratify and plan
    (["stratify", "{missing}", *STRATIFY[2:], "--out", "o.csv"], {}, USAGE, "missing.csv: cannot read"),
    (["stratify", "latin1.csv", *STRATIFY[2:], "--out", "o.csv"], {}, USAGE, "not UTF-8"),
    ([*STRATIFY, "--out", "{dir}"], {}, USAGE, "folder: is a directory"),
    ([*STRATIFY, "--out", "{no_dir}"], {}, USAGE, "no-such-folder/out.csv: cannot write"),
    ([*STRATIFY, "--out", "{under_file}"], {}, USAGE, "a-file/out.csv: cannot write"),
    ([*STRATIFY, "--out", "o.csv", "--min-per-cell", "-1"], {}, USAGE, "argument --min-per-cell"),
    (["plan", "--baseline", "0.2", "--per-arm", "-3"], {}, USAGE, "argument --per-arm"),
    # broker and publish
    (["broker", "--port", "99999"], {}, USAGE, "'99999' must be from 0 to 65535"),
    (["broker", "--port", "-1"], {}, USAGE, "argument --port"),
    (["broker", "--config", "{missing}"], {}, USAGE, "missing.csv"),
    (["publish", "--experiment", "e1", "--user", "u", "--count", "-3"], {}, USAGE, "'-3' must be at least 1"),
    (["publish", "--experiment", "e1", "--user", "u", "--count", "0"], {}, USAGE, "argument --count"),
    (["publish", "--file", "{missing}"], {}, USAGE, "file not found"),
    (["publish", "--file", "{dir}"], {}, USAGE, "is a directory"),
    (
        ["publish", "--experiment", "e1", "--user", "u"],
        {"AB_WORKER_SERVICEBUS_CONNECTION_STRING": ""},
        USAGE,
        "no Service Bus",
    ),
    (["publish", *PUBLISH, "--message-id", ""], {}, USAGE, "argument --message-id: the value is empty"),
    (["publish", *PUBLISH, "--session-id", "s" * 129], {}, USAGE, "is 129 characters; the limit is 128"),
    (["publish", *PUBLISH, "--correlation-id", "a\x1b[2Jb"], {}, USAGE, "found U+001B at index 1"),
    (["publish", *PUBLISH, "--reply-to-session-id", "r"], {}, USAGE, "--reply-to-session-id needs --reply-to"),
    (["publish", "--file", "requests.jsonl", "--message-id", "m"], {}, USAGE, "cannot go with --file"),
    (["publish", *PUBLISH, "--reply-to", "assignment-requests"], LOCAL, USAGE, "names the requests queue"),
    (["publish", *PUBLISH, "--reply-to", "sb://elsewhere.example/q"], LOCAL, USAGE, "names another namespace"),
    (["publish", *PUBLISH, "--reply-to", "t/Subscriptions/s"], LOCAL, USAGE, "is not a queue or topic name"),
    (["publish", *PUBLISH, "--reply-to", "bad name!"], LOCAL, USAGE, "is not a queue or topic name"),
    # events
    (["events", "tail", "--count", "0"], {}, USAGE, "argument --count: '0' must be at least 1"),
    (["events", "tail", "--idle", "-1"], {}, USAGE, "argument --idle: '-1' must be a number above 0"),
    (["events", "tail", "--idle", "nan"], {}, USAGE, "argument --idle"),
    (["events", "tail"], {"AB_WORKER_SERVICEBUS_CONNECTION_STRING": ""}, USAGE, "no Service Bus"),
    # dlq
    (["dlq", "peek", "--limit", "-5"], {}, USAGE, "argument --limit"),
    (["dlq", "peek", "--limit", "0"], {}, USAGE, "'0' must be at least 1"),
    (["dlq", "replay", "--rate", "-1"], {}, USAGE, "argument --rate: '-1' must be a number above 0"),
    (["dlq", "replay", "--max-replays", "0"], {}, USAGE, "argument --max-replays"),
    (["dlq", "replay", "--from", "latin1.jsonl"], {}, USAGE, "latin1.jsonl: line 1: not UTF-8"),
    (["dlq", "replay", "--from", "{missing}"], {}, USAGE, "file not found"),
    (["dlq", "replay", "--from", "{dir}"], {}, USAGE, "is a directory"),
    (["dlq", "export", "{no_dir}"], {}, USAGE, "does not exist"),
    (["dlq", "export", "{dir}"], {}, USAGE, "is a directory"),
    (["dlq", "export", "{under_file}"], {}, USAGE, "not a folder"),
    (["dlq", "peek"], {"AB_WORKER_SERVICEBUS_CONNECTION_STRING": ""}, USAGE, "no Service Bus"),
    (["dlq", "purge", "--limit", "0"], {}, USAGE, "argument --limit"),
    (["dlq", "purge", "--all", "--yes"], {"AB_WORKER_SERVICEBUS_CONNECTION_STRING": ""}, USAGE, "no Service Bus"),
    (["queue", "peek", "--limit", "-1"], {}, USAGE, "argument --limit"),
    (["queue", "dead-letter", "--sequence-number", "0"], {}, USAGE, "argument --sequence-number"),
    # report
    (["report", "--rows", "{missing}"], {}, USAGE, "missing.csv: cannot read"),
    (["report", "--rows", "{dir}"], {}, USAGE, "folder: cannot read"),
    ([*REPORT, "--html", "{no_dir}"], {}, USAGE, "does not exist"),
    ([*REPORT, "--html", "{dir}"], {}, USAGE, "is a directory"),
    ([*REPORT, "--max-errors", "0"], {}, USAGE, "argument --max-errors"),
    ([*REPORT, "--since", "last tuesday"], {}, USAGE, "argument --since"),
    (["report", "--kusto"], {"AB_WORKER_KUSTO_QUERY_URI": ""}, USAGE, "AB_WORKER_KUSTO_QUERY_URI"),
]


@pytest.mark.parametrize(("argv", "env", "status", "fragment"), MATRIX, ids=[" ".join(m[0]) for m in MATRIX])
def test_bad_input_gets_one_line_and_the_documented_status(
    argv: list[str],
    env: dict[str, str],
    status: int,
    fragment: str,
    files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each bad input exits with its documented status and one `ab-worker <command>: error:` line."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main([part.format(**files) for part in argv])
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = " ".join(argv[:2]) if argv[0] in ("dlq", "queue", "events") else argv[0]
    assert lines[0].startswith(f"ab-worker {command}: error: "), err
    assert fragment in lines[0]


def test_undecodable_input_rows_are_skipped_with_status_1(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-UTF-8 line in assign, run or report input is named and skipped (status 1), never a traceback."""
    for argv in (
        ["assign", "--experiment", "e1", "--input", "users-latin1.csv"],
        ["run", "--config", "experiments.yaml", "--input", "latin1.jsonl"],
        ["report", "--rows", "latin1.jsonl"],
    ):
        assert main(argv) == PARTIAL, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "latin1" in err


def test_port_in_use_has_its_own_status(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """`broker` and `run --local` on a taken port exit 6, naming the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv in (
            ["broker", "--port", port],
            ["run", "--config", "experiments.yaml", "--local", "--broker-port", port],
        ):
            assert main(argv) == ExitStatus.PORT_IN_USE
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"ab-worker {argv[0]}: error: 127.0.0.1:{port} is already in use")


def test_unreachable_service_has_its_own_status() -> None:
    """Translated SDK errors and connection errors map to 5 (could not reach Azure or the broker), not to 1 or 2.

    The adapters translate SDK exceptions (adapters/servicebus/errors.py); the CLI never inspects
    an exception's module, so a raw SDK error reaching it is a bug (70).
    """
    from azure.servicebus.exceptions import ServiceBusConnectionError

    from worker.domain.errors import DependencyRefused, TransientError

    assert describe(TransientError("publish failed: ServiceBusConnectionError"))[0] == ExitStatus.UNREACHABLE
    assert describe(DependencyRefused("dlq peek failed: MessagingEntityNotFoundError"))[0] == ExitStatus.UNREACHABLE
    assert describe(ServiceBusConnectionError(message="connection refused"))[0] == ExitStatus.INTERNAL
    assert describe(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))[0] == ExitStatus.UNREACHABLE
    assert describe(OSError(errno.EADDRINUSE, "in use"))[0] == ExitStatus.PORT_IN_USE
    assert describe(RuntimeError("bug"))[0] == ExitStatus.INTERNAL


def test_every_status_is_in_help_and_manual(capsys: pytest.CaptureFixture[str]) -> None:
    """`ab-worker --help` prints the exit-status table, and the manual's table matches it line for line."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert exit_status_table() in out
    manual = (Path(__file__).parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    for code, meaning in EXIT_MEANINGS.items():
        assert f"| {int(code)} | {meaning} |" in manual


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`ab-worker --version` prints the installed version."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ab-worker 0.")


# --- SIGINT mid-run: real processes, because the signal must arrive while a command is working ---


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A named pipe: a command reading it is mid-run, blocked on input, until the test closes it."""
    path = tmp_path / "input.csv"
    os.mkfifo(path)
    return path


def reading_a_pipe(pid: int) -> bool:
    """True when a thread of ``pid`` sleeps in a pipe read (the kernel's wait channel says so).

    Only sleeping threads count: a running or runnable thread's wait channel reads "0" too, and a
    process the scheduler has not yet run (a busy machine) is not waiting in its read. Where the
    kernel does not tell (a sleeping thread's wait channel of "0"), this cannot be known: True.
    """
    channels = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            state = (task / "stat").read_text(encoding="ascii").rpartition(")")[2].split()[0]
            channel = (task / "wchan").read_text(encoding="ascii").strip()
        except (OSError, IndexError):
            continue
        if state in ("S", "D"):
            channels.append(channel)
    if channels and all(channel in ("", "0") for channel in channels):
        return True
    return any("pipe" in channel for channel in channels)


def _interrupt(
    argv: list[str], fifo: Path, first_line: str, tmp_path: Path, close_first: bool = False
) -> tuple[int, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", *argv],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with fifo.open("w") as writer:  # returns once the command has opened the pipe: it is running
            writer.write(first_line)
            writer.flush()
            # Interrupt it once it waits for more input. Sent a moment before its read begins, the
            # signal is only flagged, and the read it then enters waits for ever (a busy machine hit
            # that window: no Ctrl-C is lost that way once the command is inside its read).
            wait_for(lambda: reading_a_pipe(process.pid), what=f"{argv[0]} to wait on its input")
            process.send_signal(signal.SIGINT)
            if not close_first:
                _, err = process.communicate(timeout=60)
                return process.returncode, err
        _, err = process.communicate(timeout=60)
        return process.returncode, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("argv", "first_line", "close_first"),
    [
        (["assign", "--experiment", "e1", "--input", "input.csv"], "user_id\nu1\n", False),
        (["report", "--rows", "input.csv"], "", False),
        (
            ["stratify", "input.csv", "--experiment", "x", "--arms", "a,b", "--out", "o.csv"],
            "customer_id,segment\n",
            False,
        ),
        (["run", "--config", "experiments.yaml", "--input", "input.csv"], "", True),
    ],
    ids=["assign", "report", "stratify", "run"],
)
def test_sigint_mid_run_exits_130_quietly(
    argv: list[str], first_line: str, close_first: bool, fifo: Path, tmp_path: Path
) -> None:
    """Ctrl-C while a command works: exit 130, no traceback (run first settles what it has, then exits 130)."""
    (tmp_path / "experiments.yaml").write_text(CONFIG, encoding="utf-8")
    code, err = _interrupt(argv, fifo, first_line, tmp_path, close_first)
    assert code == ExitStatus.INTERRUPTED, err
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    assert not (tmp_path / "o.csv").exists()


def test_sigint_stops_the_broker_with_130(tmp_path: Path) -> None:
    """`ab-worker broker` in the foreground: Ctrl-C stops it with 130 and no traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "broker", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("Endpoint=sb://")  # listening: mid-run
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == ExitStatus.INTERRUPTED, err
    assert "Traceback" not in err
