"""What a newcomer does first, as they would do it: `make run` (twice), the commands it suggests, `make broker`.

The Makefile runs in a checkout-like folder (its inputs linked from this one) with this test run's
virtual environment, and with a PATH that does not have that environment's ``bin``: a newcomer who
has not activated it. Each suggested command is run exactly as printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
VENV = Path(sys.prefix)
MAKE_TIMEOUT = 240


def newcomer_env(**extra: str) -> dict[str, str]:
    """The environment of a shell that has not activated the virtual environment, with no AB_WORKER_* set."""
    scripts = str(VENV / "bin")
    path = os.pathsep.join(part for part in os.environ.get("PATH", "").split(os.pathsep) if part != scripts)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("AB_WORKER_", "VIRTUAL_ENV", "MAKE"))}
    # The health endpoints would all want port 8080; a newcomer's machine has one demo, this one has many tests.
    env.update(PATH=path, AB_WORKER_HEALTH_PORT="0", **extra)
    return env


def make(checkout: Path, target: str, env: dict[str, str], *variables: str) -> subprocess.CompletedProcess[str]:
    """``make TARGET`` with the repository's Makefile, run in ``checkout``."""
    command = ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), target, f"VENV={VENV}", *variables]
    return subprocess.run(
        command, cwd=checkout, env=env, capture_output=True, text=True, timeout=MAKE_TIMEOUT, check=False
    )


def next_steps(output: str) -> list[str]:
    """The command lines the demo suggests (indented, under "next steps"), as printed."""
    block = output[output.index("next steps") :].split("\n\n", maxsplit=1)[0]
    return [line.strip() for line in block.splitlines()[1:] if line.startswith("  ")]


def run_as_printed(line: str, checkout: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One suggested line, typed into a shell."""
    return subprocess.run(
        ["bash", "-c", line], cwd=checkout, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shaped like a fresh clone, for the Makefile: its inputs linked, the environment already installed."""
    folder = tmp_path_factory.mktemp("checkout")
    for name in ("pyproject.toml", "requirements.lock", "deploy"):
        (folder / name).symlink_to(REPO / name)
    stale = subprocess.run(
        ["make", "-q", "-f", str(REPO / "Makefile"), f"{VENV}/.installed", f"VENV={VENV}"], cwd=folder, check=False
    )
    if stale.returncode != 0:
        pytest.skip(f"{VENV} is not installed by `make install` (or is out of date): the Makefile would reinstall it")
    return folder


def test_two_make_runs_leave_one_runs_files_and_next_steps_that_run_as_printed(checkout: Path) -> None:
    """`make run` twice, as a newcomer trying things does (one test: a shared fixture would run once per xdist process).

    1. Each run starts its own files: 1,101 rows, not twice that (by the third run the suggested report said SRM),
       and the 4 dead letters the documented ``report --dead-letters out/dead-letters.jsonl`` reads.
    2. Every "next steps" line runs as printed in a shell that never activated .venv.
    3. After a run on its own broker, no dead-letter command is suggested against a broker that is gone;
       the text says how to keep one (`make broker`).
    """
    for _ in range(2):
        result = make(checkout, "run", newcomer_env())
        assert result.returncode == 0, result.stderr[-3000:]
    out = checkout / "out"
    rows = (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1101
    assert len({json.loads(row)["EventId"] for row in rows}) == 1101
    letters = [json.loads(line) for line in (out / "dead-letters.jsonl").read_text(encoding="utf-8").splitlines()]
    assert Counter(letter["dead_letter_reason"] for letter in letters) == {
        "InvalidJson": 1,
        "SchemaValidationFailed": 2,
        "UnknownExperiment": 1,
    }

    steps = next_steps(result.stdout)
    assert any("--dead-letters out/dead-letters.jsonl" in step for step in steps), steps
    for step in steps:
        done = run_as_printed(step, checkout, newcomer_env())
        assert done.returncode == 0, f"{step}: {done.stderr[-2000:]}"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'class="deadletters"' in page
    assert "UnknownExperiment" in page

    assert not any(" dlq " in step for step in steps)
    assert "The embedded broker stopped with this run, and its 4 dead letters with it" in result.stdout
    assert "`make broker`" in result.stdout


@pytest.fixture
def kept_broker(checkout: Path) -> Iterator[tuple[str, str]]:
    """`make broker` in its own terminal (process group): (the connection string it prints, its stderr so far)."""
    process = subprocess.Popen(
        ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "broker", f"VENV={VENV}", "BROKER_PORT=0"],
        cwd=checkout,
        env=newcomer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        connection_string = process.stdout.readline().strip()
        guidance = "".join(iter_until(process.stderr, "dlq replay"))
        yield connection_string, guidance
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in that terminal
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            process.stdout.close()
            process.stderr.close()


def iter_until(stream: object, marker: str) -> Iterator[str]:
    """Lines of ``stream`` up to and including the first that contains ``marker``."""
    for line in stream:  # type: ignore[attr-defined]
        yield line
        if marker in line:
            return


def test_make_broker_keeps_the_demo_and_its_dead_letters_for_the_operator_commands(
    checkout: Path, kept_broker: tuple[str, str]
) -> None:
    """`make broker` prints an export line to paste; with it, `make run` uses that broker and `dlq peek` finds the 4."""
    connection_string, guidance = kept_broker
    (export,) = [line.strip() for line in guidance.splitlines() if line.strip().startswith("export ")]
    (assignment,) = shlex.split(export)[1:]
    name, _, value = assignment.partition("=")
    assert (name, value) == ("AB_WORKER_SERVICEBUS_CONNECTION_STRING", connection_string)
    env = newcomer_env(AB_WORKER_SERVICEBUS_CONNECTION_STRING=value)

    result = make(checkout, "run", env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded Service Bus broker listening" not in result.stderr, "make run started its own broker"
    steps = next_steps(result.stdout)
    (peek,) = [step for step in steps if step.endswith("dlq peek --summary")]
    summary = run_as_printed(peek, checkout, env)
    assert summary.returncode == 0, summary.stderr[-2000:]
    counts = {reason: int(n) for n, reason in re.findall(r"^\s*(\d+)\s+(\w+)$", summary.stdout, re.M)}
    assert counts == {"SchemaValidationFailed": 2, "InvalidJson": 1, "UnknownExperiment": 1}, summary.stdout
    for step in steps:
        done = run_as_printed(step, checkout, env)
        assert done.returncode == 0, f"{step}: {done.stderr[-2000:]}"
