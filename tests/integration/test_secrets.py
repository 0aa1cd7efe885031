"""No secret ever reaches output: the Service Bus key and the App Insights key, on every command path.

The worker and the operator commands run as real processes (``--log-level DEBUG``, so the Azure SDKs
narrate everything) with a connection string holding a recognisable fake key, on success paths and
on error paths; stdout, stderr, exported files and the telemetry the worker sends are searched for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient

from adapters.local.broker import LocalBroker
from adapters.local.standins.appinsights import AppInsightsStandIn
from adapters.servicebus import ServiceBusAuth, send_requests
from tests.waiting import collect, wait_for
from worker.service.redaction import REDACTED, RedactingFilter, redact

pytestmark = pytest.mark.integration

WORKER = str(Path(sys.executable).with_name("ab-worker"))
SB_KEY = "SUPERSECRETKEY123sb+Kx9/Qz0AbCdEfGhIjKlMnOpQrStUvWxYz="
SB_SECRET = "SUPERSECRETKEY123"
# Application Insights keys must be GUIDs; this one is recognisable ("5ec2e7" ≈ secret).
AI_KEY = "5ec2e75e-c2e7-45ec-8e75-ec2e75ec2e75"
AI_SECRET = "5ec2e75e-c2e7"
EXPERIMENTS = {"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]}


def sb_connection_string(port: int) -> str:
    """An emulator-style connection string to ``port`` carrying the fake secret key."""
    return (
        f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=RootManageSharedAccessKey;"
        f"SharedAccessKey={SB_KEY};UseDevelopmentEmulator=true;"
    )


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A SAS token derived from the key (sig=…) is a secret too: it grants access until it expires.
_SIGNATURE = re.compile(r"(?i)\bsig=(?!\*\*\*)[^&\s;'\"]{8,}")


def assert_clean(*texts: str) -> None:
    """None of the secrets, nor a SAS signature, appears in any of ``texts``."""
    for text in texts:
        for secret in (SB_SECRET, AI_SECRET, SB_KEY[20:40]):
            assert secret not in text, f"secret {secret!r} leaked:\n{_around(text, secret)}"
        match = _SIGNATURE.search(text)
        assert match is None, f"SAS signature leaked:\n{_around(text, match.group() if match else '')}"


def _around(text: str, needle: str) -> str:
    at = text.find(needle)
    return text[max(0, at - 300) : at + 300]


def env_for(connection_string: str | None, **extra: str) -> dict[str, str]:
    """The environment of a command: only our settings plus the fake secrets."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("AB_WORKER_", "APPLICATIONINSIGHTS_", "OTEL_"))
    }
    env["AB_WORKER_HEALTH_PORT"] = "0"
    if connection_string is not None:
        env["AB_WORKER_SERVICEBUS_CONNECTION_STRING"] = connection_string
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``ab-worker --log-level DEBUG ARGS`` to completion, output captured."""
    return subprocess.run(
        [WORKER, "--log-level", "DEBUG", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``ab-worker --log-level DEBUG ARGS`` started in the background, output piped."""
    return subprocess.Popen(
        [WORKER, "--log-level", "DEBUG", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def broker() -> Any:
    """The embedded broker (it accepts any key, so the fake one works)."""
    with LocalBroker() as running:
        yield running


@pytest.fixture
def experiments(tmp_path: Path) -> Path:
    """A registry file."""
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(EXPERIMENTS), encoding="utf-8")
    return path


# -- the redaction function ----------------------------------------------------------------------

SECRET_TEXTS = {
    "servicebus connection string": (
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
        "SharedAccessKey=SUPERSECRETKEY123abc+/def=",
        ["SUPERSECRETKEY123abc"],
    ),
    "connection string in a repr": (
        "ServiceBusClient.from_connection_string('Endpoint=sb://x/;SharedAccessKey=SUPERSECRETKEY123q==')",
        ["SUPERSECRETKEY123q"],
    ),
    "lower-case key name": ("sharedaccesskey=SUPERSECRETKEY123lower;EntityPath=q", ["SUPERSECRETKEY123lower"]),
    "storage connection string": (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=SUPERSECRETKEY123storage==;EndpointSuffix=x",
        ["SUPERSECRETKEY123storage"],
    ),
    "app insights connection string": (
        f"InstrumentationKey={AI_KEY};IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/",
        [AI_KEY],
    ),
    "sas token": (
        "SharedAccessSignature sr=amqps%3A%2F%2Fns.servicebus.windows.net%2Fq&sig=SUPERSECRETKEY123sig%2B%3D"
        "&se=1767225600&skn=RootManageSharedAccessKey",
        ["SUPERSECRETKEY123sig", "1767225600"],
    ),
    "sas query string": (
        "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2026-12-31&sig=SUPERSECRETKEY123query%3D",
        ["SUPERSECRETKEY123query"],
    ),
    "bearer token": (
        "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJTVVBFUlNFQ1JFVCJ9.SUPERSECRETKEY123jwt-_",
        ["eyJhbGciOiJSUzI1NiJ9", "SUPERSECRETKEY123jwt"],
    ),
    "bearer in an exception": (
        "HTTP 401 for headers {'Authorization': 'bearer SUPERSECRETKEY123bearer'}",
        ["SUPERSECRETKEY123bearer"],
    ),
    "password and client secret": (
        "Server=db;User Id=u;Password=SUPERSECRETKEY123pw;ClientSecret=SUPERSECRETKEY123cs",
        ["SUPERSECRETKEY123pw", "SUPERSECRETKEY123cs"],
    ),
    "two secrets on one line": (
        f"sb: SharedAccessKey={SB_KEY}; ai: InstrumentationKey={AI_KEY}",
        [SB_SECRET, AI_SECRET],
    ),
}


@pytest.mark.parametrize("name", sorted(SECRET_TEXTS))
def test_redact_removes_every_kind_of_secret(name: str) -> None:
    """redact() strips connection-string keys, SAS signatures and bearer tokens, leaving a marker."""
    text, secrets = SECRET_TEXTS[name]
    cleaned = redact(text)
    for secret in secrets:
        assert secret not in cleaned
    assert REDACTED in cleaned
    assert redact(cleaned) == cleaned, "redaction is idempotent"


@pytest.mark.parametrize(
    "text",
    [
        "processed 1000 requests: 990 assigned, 10 dead-lettered",
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey",
        "user_id: Field required; experiment_id 'exp_001' is not configured",
        "signature verified; session expired",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    """Text without secrets (key names, endpoints, messages) is returned unchanged."""
    assert redact(text) == text


def test_log_filter_redacts_arguments_and_exception_text() -> None:
    """RedactingFilter rewrites %-args and the formatted exception, so neither reaches a handler."""
    record_filter = RedactingFilter()
    try:
        raise RuntimeError(f"connect failed for SharedAccessKey={SB_KEY}")
    except RuntimeError:
        record = logging.LogRecord(
            "worker", logging.ERROR, __file__, 1, "using %s", (f"SharedAccessKey={SB_KEY}",), sys.exc_info()
        )
    assert record_filter.filter(record)
    formatted = logging.Formatter("%(message)s").format(record)
    assert_clean(formatted)
    assert REDACTED in formatted


def test_auth_repr_hides_the_connection_string() -> None:
    """ServiceBusAuth's repr (what a debugger or log line would show) omits the connection string."""
    auth = ServiceBusAuth(connection_string=sb_connection_string(5672))
    assert_clean(repr(auth), str(auth))


# -- real processes ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_worker_run_at_debug_with_telemetry_leaks_nothing(broker: LocalBroker, experiments: Path) -> None:
    """`ab-worker run --drain` at DEBUG with App Insights on: neither key in stdout, stderr or telemetry."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        bodies = [json.dumps({"user_id": f"U{i}", "experiment_id": "exp_001"}).encode() for i in range(30)]
        bodies += [b"\xff not json", json.dumps({"user_id": "x", "experiment_id": "nope"}).encode()]
        send_requests(client, "assignment-requests", bodies)
    with AppInsightsStandIn(instrumentation_key=AI_KEY) as insights:
        env = env_for(
            sb_connection_string(broker.port),
            APPLICATIONINSIGHTS_CONNECTION_STRING=insights.connection_string,
            AB_WORKER_MAX_WAIT="1.0",
        )
        result = run_cli(env, "run", "--config", str(experiments), "--drain", timeout=90)
        # The search below proves something only if telemetry arrived (the worker flushes it on exit).
        wait_for(insights.spans, what="the worker's spans", detail=lambda: result.stderr[-3000:])
        telemetry = insights.raw_text()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processed 32 requests: 30 assigned, 2 dead-lettered" in result.stderr
    assert "DEBUG" in result.stderr, "the SDKs did not log at DEBUG: the test proves less than it claims"
    assert_clean(result.stdout, result.stderr)
    assert SB_SECRET not in telemetry
    assert _SIGNATURE.search(telemetry) is None


@pytest.mark.timeout(120)
def test_operator_commands_leak_nothing(broker: LocalBroker, tmp_path: Path) -> None:
    """publish, dlq peek/export/replay at DEBUG: the key appears in no output and no exported file."""
    env = env_for(
        sb_connection_string(broker.port), APPLICATIONINSIGHTS_CONNECTION_STRING=f"InstrumentationKey={AI_KEY}"
    )
    outputs: list[str] = []
    publish = run_cli(env, "publish", "--experiment", "exp_missing", "--user", "U1", "--count", "3")
    assert publish.returncode == 0, publish.stderr[-3000:]
    outputs += [publish.stdout, publish.stderr]
    # Dead-letter them so the dlq commands have something to show and move.
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_receiver("assignment-requests") as receiver,
    ):
        got = collect(lambda: receiver.receive_messages(max_message_count=3, max_wait_time=2), 3, what="3 requests")
        for message in got:
            receiver.dead_letter_message(message, reason="UnknownExperiment", error_description="not configured")
    exported = tmp_path / "dlq.jsonl"
    for args in (
        ("dlq", "peek", "--summary"),
        ("dlq", "peek", "--json"),
        ("dlq", "export", str(exported)),
        ("dlq", "replay", "--reason", "UnknownExperiment", "--dry-run"),
        ("dlq", "replay", "--reason", "UnknownExperiment", "--verbose"),
    ):
        result = run_cli(env, *args)
        assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
        outputs += [result.stdout, result.stderr]
    assert "3  UnknownExperiment" in outputs[2]
    assert broker.message_counts("assignment-requests")["active"] == 3, "replay moved them back"
    assert_clean(*outputs, exported.read_text(encoding="utf-8"))


@pytest.mark.timeout(120)
def test_error_paths_leak_nothing(experiments: Path, tmp_path: Path) -> None:
    """Closed port, malformed connection string, bad settings, bad App Insights key: errors name no secret."""
    dead = sb_connection_string(closed_port())
    outputs: list[str] = []
    procs: list[tuple[tuple[str, ...], subprocess.Popen[str]]] = []
    args: tuple[str, ...]
    for env, args in (
        (env_for(dead), ("publish", "--experiment", "exp_001", "--user", "U1")),
        (env_for(dead), ("dlq", "peek", "--summary")),
        (env_for(dead), ("dlq", "replay", "--reason", "UnknownExperiment")),
        (env_for(f"Endpoint=not-a-url;SharedAccessKey={SB_KEY}"), ("publish", "--experiment", "e", "--user", "u")),
        (env_for(f"SharedAccessKey={SB_KEY}"), ("dlq", "peek")),
        (env_for(dead, AB_WORKER_MAX_BATCH="lots"), ("run", "--config", str(experiments))),
        (
            env_for(dead, APPLICATIONINSIGHTS_CONNECTION_STRING=f"InstrumentationKey=SECRET-{SB_SECRET}"),
            ("run", "--config", str(experiments), "--drain"),
        ),
        (
            env_for(dead, APPLICATIONINSIGHTS_CONNECTION_STRING=f"InstrumentationKey={AI_KEY}"),
            ("validate-config", str(experiments)),
        ),
    ):
        # Concurrently: each waits out the SDK's connection retries, which is most of the time spent.
        procs.append((args, start_cli(env, *args)))
    try:
        for args, proc in procs:
            stdout, stderr = proc.communicate(timeout=90)
            assert proc.returncode != 0 or args[0] == "validate-config", f"{args} succeeded against a closed port"
            if args[0] in ("publish", "dlq") and "not-a-url" not in str(proc.args) and proc.returncode != 2:
                # Could not reach the broker: its own exit status, 5, and (after the DEBUG log) one error line.
                assert proc.returncode == 5, f"{args}: {stderr[-3000:]}"
                assert "error: could not reach Azure or the broker" in stderr.strip().splitlines()[-1]
            outputs += [stdout, stderr]
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    assert_clean(*outputs)


def retried_after_backoff(stderr: str) -> bool:
    """True once the worker reported the broker unavailable and then tried to connect again."""
    _, said, after = stderr.partition("broker unavailable")
    return bool(said) and "Connection refused" in after.partition("\n")[2]


@pytest.mark.timeout(120)
def test_worker_against_a_closed_port_leaks_nothing_and_stops_on_sigterm(experiments: Path, tmp_path: Path) -> None:
    """`ab-worker run` retrying an unreachable namespace at DEBUG: retries logged, key never, exits 0 on SIGTERM."""
    env = env_for(
        sb_connection_string(closed_port()),
        APPLICATIONINSIGHTS_CONNECTION_STRING=f"InstrumentationKey={AI_KEY};IngestionEndpoint=http://127.0.0.1:{closed_port()}/",
    )
    err = tmp_path / "stderr.txt"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [WORKER, "--log-level", "DEBUG", "run", "--config", str(experiments)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
        try:
            # SIGTERM once the worker has given up on the broker and tried again after its backoff, so
            # both its own retry and the SDK's narration of it are in the output searched below.
            wait_for(
                lambda: retried_after_backoff(err.read_text(errors="replace")),
                60,
                "the worker to retry the broker after its backoff",
                detail=lambda: err.read_text(errors="replace")[-3000:],
            )
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    text = err.read_text(encoding="utf-8", errors="replace")
    assert "broker unavailable" in text
    assert proc.returncode == 0, text[-3000:]
    assert_clean(stdout.decode(errors="replace"), text)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["publish", "run"])
def test_malformed_connection_string_is_a_configuration_error(command: str, experiments: Path) -> None:
    """A connection string that is not one: exit 2 with a one-line error naming the variable, no traceback."""
    env = env_for(f"Endpoint=not-a-url;SharedAccessKey={SB_KEY}")
    args = (
        ["publish", "--experiment", "e", "--user", "u"]
        if command == "publish"
        else ["run", "--config", str(experiments)]
    )
    result = run_cli(env, *args)
    assert_clean(result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert "AB_WORKER_SERVICEBUS_CONNECTION_STRING" in result.stderr
