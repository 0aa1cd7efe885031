"""The publisher's surfaces through the real SDK against the embedded broker's default entities:
``publish``'s request/reply properties, the manual's request/reply example, and ``events tail``."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from adapters.local.broker import LocalBroker
from tests.waiting import collect
from worker.cli import main
from worker.cli.common import ExitStatus
from worker.service.handling import event_id_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
QUEUE, TOPIC, REPLIES = "assignment-requests", "assignment-events", "assignment-replies"


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBroker]:
    """The embedded broker with its default entities (what `ab-worker broker` serves), configured for the CLI."""
    for name in list(os.environ):
        if name.startswith("AB_WORKER_"):
            monkeypatch.delenv(name)
    with LocalBroker() as running:
        monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", running.connection_string)
        monkeypatch.setenv("AB_WORKER_HEALTH_PORT", "0")
        yield running


def _receive(broker: LocalBroker, queue: str, expected: int) -> list:
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_receiver(queue) as receiver,
    ):
        messages = collect(
            lambda: receiver.receive_messages(max_message_count=expected, max_wait_time=1),
            expected,
            what=f"{expected} messages on {queue}",
        )
        for message in messages:
            receiver.complete_message(message)
    return messages


# -- publish: the request/reply properties ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_publish_sets_the_request_reply_properties(broker: LocalBroker, capsys: pytest.CaptureFixture[str]) -> None:
    """--reply-to, --reply-to-session-id, --correlation-id, --message-id and --session-id arrive; two copies
    under one --message-id are one request to the queue's duplicate detection, which keeps the first."""
    code = main(
        [
            "publish", "--experiment", "exp_001", "--user", "U123", "--count", "2",
            "--reply-to", REPLIES, "--reply-to-session-id", "caller-7", "--correlation-id", "order-77",
            "--message-id", "ask-1", "--session-id", "s-1",
        ]
    )  # fmt: skip
    assert code == ExitStatus.OK, capsys.readouterr().err
    # Both were sent: the queue holds what its duplicate detection kept (not a wait for a second in vain).
    assert broker.message_counts(QUEUE)["active"] == 1
    messages = _receive(broker, QUEUE, expected=1)
    for message in messages:
        assert (message.reply_to, message.reply_to_session_id) == (REPLIES, "caller-7")
        assert (message.correlation_id, message.message_id, message.session_id) == ("order-77", "ask-1", "s-1")
        assert message.content_type == "application/json"
        assert json.loads(b"".join(message.body)) == {"user_id": "U123", "experiment_id": "exp_001"}


@pytest.mark.timeout(60)
def test_publish_without_the_flags_sets_none_of_them(broker: LocalBroker) -> None:
    """No flag, no property: the SDK picks no message id of ours and leaves reply_to and the rest unset."""
    assert main(["publish", "--experiment", "exp_001", "--user", "U1"]) == ExitStatus.OK
    (message,) = _receive(broker, QUEUE, expected=1)
    assert (message.reply_to, message.correlation_id, message.session_id, message.reply_to_session_id) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--reply-to", QUEUE], "names the requests queue"),
        (["--reply-to", "assignment-events/Subscriptions/all"], "is not a queue or topic name"),
        (["--reply-to", "sb://elsewhere.servicebus.windows.net/replies"], "names another namespace"),
        (["--message-id", ""], "--message-id: the value is empty"),
        (["--correlation-id", "x" * 129], "--correlation-id: the value is 129 characters; the limit is 128"),
        (["--session-id", "a\u202eb"], "--session-id: the value must not contain control, invisible or bidi"),
        (["--reply-to-session-id", "r"], "--reply-to-session-id needs --reply-to"),
    ],
    ids=["requests-queue", "subscription", "other-namespace", "empty-id", "long-id", "bidi-id", "session-alone"],
)
def test_publish_refuses_bad_values_and_sends_nothing(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str], flags: list[str], why: str
) -> None:
    """A value the worker would dead-letter the request for (or Service Bus refuse): one line, exit 2, nothing sent."""
    code = main(["publish", "--experiment", "exp_001", "--user", "U1", *flags])
    err = capsys.readouterr().err
    assert code == ExitStatus.USAGE
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ab-worker publish: error: ")
    assert why in err
    assert "\u202e" not in err
    assert "Traceback" not in err
    assert broker.message_counts(QUEUE)["active"] == 0


# -- the manual's request/reply example, as written -------------------------------------------------


def _readme_request_reply_commands() -> list[list[str]]:
    """The ab-worker lines of the wire contract's request/reply block, without the broker and export lines."""
    readme = (REPO / "docs" / "wire-contract.md").read_text(encoding="utf-8")
    start = readme.index("Request/reply on the embedded broker, as written here")
    block = re.search(r"```bash\n(.*?)```", readme[start:], re.S)
    assert block is not None
    lines = block.group(1).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    assert commands[0][:2] == ["ab-worker", "broker"]
    assert commands[1][0] == "export"
    return [command[1:] for command in commands[2:] if command]


@pytest.mark.timeout(120)
def test_request_reply_example_runs_as_written(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish --reply-to assignment-replies, run the worker, read the event from the reply queue and the topic."""
    monkeypatch.chdir(REPO)
    publish, run, peek, tail = _readme_request_reply_commands()
    assert publish[0] == "publish"
    assert "--reply-to" in publish
    for argv in (publish, run):
        assert main(argv) == ExitStatus.OK, capsys.readouterr().err
    capsys.readouterr()

    assert main(peek) == ExitStatus.OK
    (line,) = capsys.readouterr().out.splitlines()
    reply = json.loads(line)
    assert (reply["correlation_id"], reply["message_id"]) == ("order-77", event_id_for("ask-1"))
    event = json.loads(reply["body"])
    assert (event["user_id"], event["experiment_id"], event["variant_id"]) == ("U123", "exp_001", "A")
    assert broker.message_counts(REPLIES)["active"] == 1  # peeked, not taken

    assert main(tail) == ExitStatus.OK
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == event


# -- events tail -------------------------------------------------------------------------------------


def _publish_events(broker: LocalBroker, experiments: list[str]) -> None:
    """Events on the topic as the worker sends them: JSON body, experiment_id application property."""
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_topic_sender(TOPIC) as sender,
    ):
        sender.send_messages(
            [
                ServiceBusMessage(
                    json.dumps({"event_id": f"e{i}", "experiment_id": e, "user_id": f"U{i}", "variant_id": "A"}),
                    message_id=f"e{i}",
                    application_properties={"experiment_id": e},
                )
                for i, e in enumerate(experiments)
            ]
        )


@pytest.mark.timeout(60)
def test_events_tail_prints_one_experiment_and_leaves_the_rest(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """--experiment and --count: only that experiment's events, then stop; unread events stay, audit untouched."""
    _publish_events(broker, ["exp_a", "exp_b", "exp_a", "exp_b", "exp_a", "exp_a"])
    assert main(["events", "tail", "--experiment", "exp_a", "--count", "2"]) == ExitStatus.OK
    out, err = capsys.readouterr()
    printed = [json.loads(line) for line in out.splitlines()]
    assert [(e["event_id"], e["experiment_id"]) for e in printed] == [("e0", "exp_a"), ("e2", "exp_a")]
    assert "read 2 events from assignment-events/Subscriptions/all" in err
    # Read and filtered out (e1) or printed (e0, e2) were consumed; the rest waits for the next tail.
    assert broker.message_counts(f"{TOPIC}/Subscriptions/all")["active"] == 3
    assert broker.message_counts(f"{TOPIC}/Subscriptions/audit")["active"] == 6

    assert main(["events", "tail", "--count", "3"]) == ExitStatus.OK
    rest = [json.loads(line)["event_id"] for line in capsys.readouterr().out.splitlines()]
    assert rest == ["e3", "e4", "e5"]
    # Nothing else was left: an idle tail now reads nothing (idle, not a race with a slow delivery).
    assert broker.message_counts(f"{TOPIC}/Subscriptions/all")["active"] == 0
    assert main(["events", "tail", "--idle", "1"]) == ExitStatus.OK
    assert capsys.readouterr().out == ""


@pytest.mark.timeout(60)
def test_events_tail_on_a_missing_subscription_is_one_line(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subscription that does not exist: exit 5 and one line naming it, no traceback."""
    code = main(["events", "tail", "--subscription", "nope", "--idle", "1"])
    err = capsys.readouterr().err
    assert code == ExitStatus.UNREACHABLE
    assert len(err.strip().splitlines()) == 1, err
    assert "assignment-events/Subscriptions/nope" in err
    assert "MessagingEntityNotFoundError" in err
    assert "Traceback" not in err
    assert "SharedAccessKey" not in err


@pytest.mark.timeout(90)
def test_events_tail_exits_130_quietly_on_sigint(broker: LocalBroker) -> None:
    """Ctrl-C while tail waits for events: exit 130, no traceback, nothing else on stderr."""
    env = {**os.environ, "AB_WORKER_SERVICEBUS_CONNECTION_STRING": broker.connection_string}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "events", "tail"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert process.stderr.readline().startswith("reading events from ")  # the receiver is open: mid-run
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == ExitStatus.INTERRUPTED, err
    assert err.strip() == "", err


@pytest.mark.timeout(60)
def test_events_tail_on_a_terminal_shows_one_escaped_line_per_event(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal: experiment, user → variant, correlation and event id; control and bidi characters escaped."""
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_topic_sender(TOPIC) as sender,
    ):
        body = {"experiment_id": "exp_001", "user_id": "U\x1b[2J\u202e1", "variant_id": "B", "segment": "vip"}
        sender.send_messages(ServiceBusMessage(json.dumps(body), message_id="ev-1", correlation_id="order-9"))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["events", "tail", "--count", "1"]) == ExitStatus.OK
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith("  exp_001 [vip]  U\\x1b[2J\\u202e1 → B  (correlation order-9, event ev-1)")
    assert "\x1b" not in line
    assert "\u202e" not in line
