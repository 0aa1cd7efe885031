"""Dead-letter and queue operations through the real SDK against the embedded broker: replay finds
every match, loses nothing under duplicate detection, keeps locks, never caps silently."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

from adapters.local.broker import LocalBroker
from adapters.servicebus import LockKeeper
from adapters.servicebus.dlq import SKIP_NOT_RECEIVED, DeadLetter, Entity, ReplayFilter, browse, replay
from tests.integration.emulator import emulator_config, queue, running_broker
from tests.waiting import collect, wait_for
from worker.cli import main

pytestmark = pytest.mark.integration

QUEUE, EXPIRING, SLOW, TOPIC = "assignment-requests", "expiring", "slow-lock", "assignment-events"
CONFIG = emulator_config(
    [
        queue(QUEUE, MaxDeliveryCount=10, RequiresDuplicateDetection=True, DuplicateDetectionHistoryTimeWindow="PT5M"),
        # Messages sent with a short time-to-live land in its DLQ by themselves: a cheap
        # way to build a large DLQ, and replayed copies (which keep their TTL) come back
        # as new dead letters while a replay runs, as a worker re-dead-lettering them would.
        queue(EXPIRING, DeadLetteringOnMessageExpiration=True),
        queue(SLOW, LockDuration="PT3S", MaxDeliveryCount=10),
    ],
    [
        {
            "Name": TOPIC,
            "Properties": {"RequiresDuplicateDetection": True, "DuplicateDetectionHistoryTimeWindow": "PT5M"},
            "Subscriptions": [{"Name": "all"}, {"Name": "audit"}],
        }
    ],
)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBroker]:
    """The embedded broker with duplicate detection on, and the CLI pointed at it."""
    with running_broker(CONFIG, monkeypatch) as running:
        yield running


@pytest.fixture
def client(broker: LocalBroker) -> Iterator[ServiceBusClient]:
    """An SDK client on the broker."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as sb:
        yield sb


def _body(user: str, experiment: str, **extra: Any) -> bytes:
    return json.dumps({"user_id": user, "experiment_id": experiment, **extra}, ensure_ascii=False).encode()


def _expire_into_dlq(broker: LocalBroker, client: ServiceBusClient, bodies: list[bytes]) -> None:
    expected = broker.message_counts(EXPIRING)["dead_letter"] + len(bodies)
    with client.get_queue_sender(EXPIRING) as sender:
        for start in range(0, len(bodies), 100):
            chunk = bodies[start : start + 100]
            sender.send_messages([ServiceBusMessage(b, time_to_live=timedelta(seconds=1)) for b in chunk])
    wait_for(lambda: broker.message_counts(EXPIRING)["dead_letter"] == expected, 60, "messages to expire")


def _dead_letter(client: ServiceBusClient, queue: str, messages: list[ServiceBusMessage], reason: str) -> None:
    with client.get_queue_sender(queue) as sender:
        sender.send_messages(messages)
    with client.get_queue_receiver(queue) as receiver:
        for message in collect(
            lambda: receiver.receive_messages(max_message_count=len(messages), max_wait_time=5),
            len(messages),
            what=f"the {len(messages)} messages to dead-letter",
        ):
            receiver.dead_letter_message(message, reason=reason, error_description="test")


def _dlq(client: ServiceBusClient, entity: str) -> list[DeadLetter]:
    return list(browse(client, Entity.parse(entity)))


def _one_line_error(err: str, command: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ab-worker {command}: error: ")
    assert "Traceback" not in err


def test_replayed_subscription_dead_letters_survive_the_topics_duplicate_detection(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Within the duplicate-detection window the copies get a new id, so the topic accepts them."""
    with client.get_topic_sender(TOPIC) as sender:
        sender.send_messages([ServiceBusMessage(_body(f"U{i}", "exp"), message_id=f"evt-{i}") for i in range(3)])
    with client.get_subscription_receiver(TOPIC, "all") as receiver:
        got = collect(lambda: receiver.receive_messages(max_message_count=3, max_wait_time=5), 3, what="3 events")
        for message in got:
            receiver.dead_letter_message(message, reason="Bad", error_description="subscriber failed")
    with client.get_subscription_receiver(TOPIC, "audit") as receiver:
        for message in collect(
            lambda: receiver.receive_messages(max_message_count=3, max_wait_time=5), 3, what="3 audit events"
        ):
            receiver.complete_message(message)
    entity = f"{TOPIC}/Subscriptions/all"

    assert main(["dlq", "replay", "--entity", entity, "--reason", "Bad"]) == 0

    counts = broker.message_counts(entity)
    assert counts["dead_letter"] == 0
    assert counts["active"] == 3, "the topic dropped the replayed copies as duplicates"
    assert "replayed 3 of 3" in capsys.readouterr().err
    with client.get_subscription_receiver(TOPIC, "all") as receiver:
        copies = collect(lambda: receiver.receive_messages(max_message_count=3, max_wait_time=5), 3, what="3 copies")
    originals = []
    for m in copies:
        original = (m.application_properties or {})[b"ab_replay_original_message_id"]
        assert isinstance(original, bytes)
        originals.append(original.decode())
    originals.sort()
    assert originals == ["evt-0", "evt-1", "evt-2"]
    assert all(not str(m.message_id).startswith("evt-") or "/replay-1-" in str(m.message_id) for m in copies)
    assert len({str(m.message_id) for m in copies}) == 3


def test_replay_finds_five_matches_behind_150_others_and_replays_each_once(
    broker: LocalBroker, client: ServiceBusClient
) -> None:
    """150 non-matching dead letters ahead; a 'worker' re-dead-letters each copy during the scan."""
    _expire_into_dlq(broker, client, [_body(f"O{i}", "exp_other") for i in range(150)])
    _expire_into_dlq(broker, client, [_body(f"X{i}", "exp_x") for i in range(150, 155)])
    # One more matching dead letter behind them, so the scan is still running when copies return.
    _expire_into_dlq(broker, client, [_body("O-last", "exp_other")] * 40 + [_body("X-last", "exp_x")])

    def worker_dead_letters_the_copy(letter: DeadLetter, what: str) -> None:
        with client.get_queue_receiver(EXPIRING) as receiver:
            (message,) = collect(
                lambda: receiver.receive_messages(max_message_count=1, max_wait_time=5), 1, what=f"the copy of {what}"
            )
            receiver.dead_letter_message(message, reason="TTLExpiredException", error_description="again")

    entity = Entity.parse(EXPIRING)
    outcome = replay(client, entity, ReplayFilter(experiment="exp_x"), on_progress=worker_dead_letters_the_copy)

    assert [x.request["user_id"] for x in outcome.replayed] == [f"X{i}" for i in range(150, 155)] + ["X-last"]
    assert outcome.skipped == []
    assert outcome.selection.not_matching == 190
    wait_for(lambda: broker.message_counts(EXPIRING)["active"] == 0, 60, "copies to be dead-lettered again")
    letters = _dlq(client, EXPIRING)
    matching = [x for x in letters if x.request.get("experiment_id") == "exp_x"]
    assert sorted(x.replay_count for x in matching) == [1] * 6, "a dead letter was replayed twice or not at all"
    assert max(x.delivery_count for x in letters if x.replay_count == 0) <= 1


def test_replay_walks_1500_dead_letters_and_every_command_says_how_many(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """1,500 dead letters: summary, export, dry run and replay see all of them, and a --limit is reported."""
    _expire_into_dlq(broker, client, [_body(f"U{i}", "exp_x" if i % 2 else "exp_other") for i in range(1500)])

    assert main(["dlq", "peek", "--entity", EXPIRING, "--summary"]) == 0
    assert "1500  total" in capsys.readouterr().out.replace(",", "")
    exported = tmp_path / "dlq.jsonl"
    assert main(["dlq", "export", str(exported), "--entity", EXPIRING]) == 0
    assert "all 1,500" in capsys.readouterr().err
    assert len(exported.read_text(encoding="utf-8").split("\n")) == 1501
    assert main(["dlq", "peek", "--entity", EXPIRING, "--limit", "1000", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1000
    assert "1,000 of 1,500" in err
    assert main(["dlq", "replay", "--entity", EXPIRING, "--experiment", "exp_x", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 750
    assert "would replay 750 of 750" in err

    assert main(["dlq", "replay", "--entity", EXPIRING, "--experiment", "exp_x"]) == 0

    assert "replayed 750 of 750" in capsys.readouterr().err
    wait_for(lambda: broker.message_counts(EXPIRING)["active"] == 0, 60, "copies to expire again")
    letters = _dlq(client, EXPIRING)
    assert len(letters) == 1500
    assert sorted(x.replay_count for x in letters if x.request["experiment_id"] == "exp_x") == [1] * 750
    assert max(x.delivery_count for x in letters if x.replay_count == 0) <= 1


def test_slow_replay_keeps_locks_past_the_lock_duration(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """--rate 2 over 8 dead letters takes 4 s on a 3 s lock: locks are renewed, nothing is duplicated."""
    others = [ServiceBusMessage(_body(f"O{i}", "exp_other")) for i in range(20)]
    targets = [ServiceBusMessage(_body(f"X{i}", "exp_x")) for i in range(8)]
    _dead_letter(client, SLOW, others + targets, reason="UnknownExperiment")

    assert main(["dlq", "replay", "--entity", SLOW, "--experiment", "exp_x", "--rate", "2"]) == 0

    assert "replayed 8 of 8" in capsys.readouterr().err
    assert broker.message_counts(SLOW)["active"] == 8
    letters = _dlq(client, SLOW)
    assert len(letters) == 20
    assert all(x.delivery_count <= 1 for x in letters), [x.delivery_count for x in letters]


def test_replay_keeps_addressing_and_round_trips_line_separators(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """reply_to, subject, correlation id and properties survive replay; U+2028/U+2029/U+0085 survive export."""
    odd = "a\u2028b\u2029c\u0085d"
    body = _body(odd, "exp_x")
    message = ServiceBusMessage(
        body,
        message_id="req-1",
        correlation_id="corr-1",
        reply_to="replies",
        subject="assign",
        content_type="application/json",
        application_properties={"tenant": "t1"},
    )
    _dead_letter(client, QUEUE, [message], reason="UnknownExperiment")
    exported = tmp_path / "dlq.jsonl"
    assert main(["dlq", "export", str(exported)]) == 0
    hand_written = tmp_path / "hand.jsonl"
    line = json.loads(exported.read_text(encoding="utf-8").split("\n")[0])
    hand_written.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    assert "\u2028" in hand_written.read_text(encoding="utf-8")

    assert main(["dlq", "replay", "--from", str(hand_written)]) == 0
    assert main(["dlq", "replay", "--reason", "UnknownExperiment"]) == 0

    capsys.readouterr()
    with client.get_queue_receiver(QUEUE) as receiver:
        # As many as the queue holds (a copy dropped as a duplicate is not there to wait for).
        present = broker.message_counts(QUEUE)["active"]
        copies = collect(lambda: receiver.receive_messages(max_message_count=2, max_wait_time=5), present)
    assert len(copies) == 2, "one copy was dropped as a duplicate"
    for copy in copies:
        assert b"".join(copy.body) == body
        assert (copy.reply_to, copy.subject, copy.correlation_id) == ("replies", "assign", "corr-1")
        assert copy.content_type == "application/json"
        props = copy.application_properties or {}
        assert props[b"tenant"] == b"t1"
        assert props[b"ab_replay_original_message_id"] == b"req-1"
        assert str(copy.message_id) != "req-1"


def test_queue_peek_finds_a_poison_message_and_dead_letter_moves_it(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue peek shows active messages with control characters escaped; queue dead-letter moves the chosen one."""
    with client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(
            [ServiceBusMessage(_body(f"U{i}", "exp"), message_id=f"m{i}") for i in range(3)]
            + [ServiceBusMessage(_body("\x1b[2J\x1b]0;pwned\x07\u009b31m", "exp"), message_id="poison")]
            + [ServiceBusMessage(_body("U9", "exp"), message_id="m9")]
        )
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["queue", "peek"]) == 0
    out = capsys.readouterr().out
    assert "poison" in out
    for raw in ("\x1b", "\x07", "\u009b"):
        assert raw not in out
    assert "\\x1b[2J" in out

    assert main(["queue", "dead-letter", "--message-id", "poison", "--description", "crashes the worker"]) == 0

    counts = broker.message_counts(QUEUE)
    assert (counts["active"], counts["dead_letter"]) == (4, 1)
    (letter,) = _dlq(client, QUEUE)
    assert (letter.message_id, letter.reason, letter.description) == (
        "poison",
        "DeadLetteredByOperator",
        "crashes the worker",
    )
    capsys.readouterr()
    assert main(["queue", "dead-letter", "--message-id", "nope"]) == 2
    _one_line_error(capsys.readouterr().err, "queue dead-letter")


def test_dlq_peek_escapes_control_characters_in_every_column(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Terminal escape sequences in a body, reason or description are shown escaped, table and JSON."""
    _dead_letter(
        client,
        QUEUE,
        [ServiceBusMessage(_body("\x1b[31mred", "e\x1b]8;;x\x07", n="\u009b1m\u202e"))],
        reason="UnknownExperiment",
    )
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["dlq", "peek"]) == 0
    out = capsys.readouterr().out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert main(["dlq", "peek"]) == 0
    out += capsys.readouterr().out
    for raw in ("\x1b", "\x07", "\u009b", "\u202e"):
        assert raw not in out


def test_purge_needs_a_filter_and_a_confirmation(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --yes (and no terminal) purge refuses; with a filter and --yes it deletes only the matches."""
    _dead_letter(client, QUEUE, [ServiceBusMessage(_body(f"U{i}", "exp")) for i in range(3)], "InvalidJson")
    _dead_letter(client, QUEUE, [ServiceBusMessage(_body(f"V{i}", "exp")) for i in range(2)], "UnknownExperiment")

    assert main(["dlq", "purge", "--reason", "InvalidJson"]) == 2
    _one_line_error(capsys.readouterr().err, "dlq purge")
    assert main(["dlq", "purge", "--yes"]) == 2
    _one_line_error(capsys.readouterr().err, "dlq purge")
    assert broker.message_counts(QUEUE)["dead_letter"] == 5
    assert main(["dlq", "purge", "--reason", "InvalidJson", "--dry-run"]) == 0
    assert "would purge 3 of 3" in capsys.readouterr().err
    assert broker.message_counts(QUEUE)["dead_letter"] == 5

    assert main(["dlq", "purge", "--reason", "InvalidJson", "--yes"]) == 0

    assert "purged 3 of 3" in capsys.readouterr().err
    assert sorted(x.reason for x in _dlq(client, QUEUE)) == ["UnknownExperiment"] * 2


def test_replay_without_a_filter_needs_all_and_unknown_reasons_are_errors(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """No filter and no --all: refused (no terminal to ask on); a typo in --reason lists the known reasons."""
    _dead_letter(client, QUEUE, [ServiceBusMessage(_body(f"U{i}", "exp")) for i in range(2)], "UnknownExperiment")

    assert main(["dlq", "replay"]) == 2
    _one_line_error(capsys.readouterr().err, "dlq replay")
    assert main(["dlq", "replay", "--reason", "UnknownExperiments"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "dlq replay")
    for known in ("UnknownExperiment,", "MaxDeliveryCountExceeded", "TTLExpiredException"):
        assert known in err
    assert broker.message_counts(QUEUE)["dead_letter"] == 2

    assert main(["dlq", "replay", "--all"]) == 0

    assert broker.message_counts(QUEUE)["dead_letter"] == 0
    assert broker.message_counts(QUEUE)["active"] == 2


def test_dlq_cli_bad_paths_and_numbers_are_one_line_errors(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Unwritable export paths, non-UTF-8 replay files and nonsense numbers: one line, exit 2, no traceback."""
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"body": "caf\xe9"}\n')
    for argv in (
        ["dlq", "export", str(tmp_path / "missing" / "x.jsonl")],
        ["dlq", "export", str(tmp_path)],
        ["dlq", "replay", "--from", str(latin1)],
    ):
        assert main(argv) == 2, argv
        _one_line_error(capsys.readouterr().err, " ".join(argv[:2]))
    for argv in (["dlq", "peek", "--limit", "0"], ["dlq", "replay", "--all", "--rate", "-1"]):
        assert main(argv) == 2, argv
        _one_line_error(capsys.readouterr().err, " ".join(argv[:2]))


def test_a_dead_letter_locked_elsewhere_is_reported_skipped_not_silently_left(
    broker: LocalBroker, client: ServiceBusClient
) -> None:
    """A match another receiver holds is skipped with its reason; the rest are replayed."""
    _dead_letter(client, QUEUE, [ServiceBusMessage(_body(f"U{i}", "exp")) for i in range(3)], "UnknownExperiment")
    with client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as other:
        (taken,) = collect(lambda: other.receive_messages(max_message_count=1, max_wait_time=5), 1, what="a match")
        # The other receiver keeps its lock for as long as the replay takes, as a worker would: the
        # replay takes seconds, and a minute on a busy machine, longer than the 60 s lock.
        keeper = LockKeeper()
        keeper.hold(other, [taken])
        try:
            outcome = replay(client, Entity.parse(QUEUE), ReplayFilter(reason="UnknownExperiment"), max_wait=0.5)
        finally:
            keeper.release(taken)
            keeper.close()
        other.abandon_message(taken)

    assert len(outcome.replayed) == 2
    assert [(x.sequence_number, why) for x, why in outcome.skipped] == [(taken.sequence_number, SKIP_NOT_RECEIVED)]
    assert broker.message_counts(QUEUE)["dead_letter"] == 1


def test_dead_letters_with_an_odd_amqp_body_are_listed_and_replayed(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """An AMQP map body with a binary key (not JSON-able) does not crash peek, export or replay."""
    from azure.servicebus.amqp import AmqpAnnotatedMessage

    with client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(AmqpAnnotatedMessage(value_body={b"k": 1}))
    with client.get_queue_receiver(QUEUE) as receiver:
        (message,) = collect(lambda: receiver.receive_messages(max_message_count=1, max_wait_time=5), 1)
        receiver.dead_letter_message(message, reason="InvalidJson", error_description="map body")

    assert main(["dlq", "peek", "--json"]) == 0
    assert "InvalidJson" in capsys.readouterr().out
    assert main(["dlq", "replay", "--reason", "InvalidJson"]) == 0
    assert broker.message_counts(QUEUE)["active"] == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_replay_all_and_purge_ask_first(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No filter on a terminal: replay asks; 'n' (or end of input) changes nothing, 'y' replays; purge asks too."""
    _dead_letter(client, QUEUE, [ServiceBusMessage(_body(f"U{i}", "exp")) for i in range(2)], "UnknownExperiment")
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    assert main(["dlq", "purge", "--all"]) == 0
    assert main(["dlq", "replay"]) == 0
    assert "cancelled: nothing was changed" in capsys.readouterr().err
    assert broker.message_counts(QUEUE)["dead_letter"] == 2

    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    assert main(["dlq", "replay"]) == 0

    assert broker.message_counts(QUEUE)["dead_letter"] == 0
    assert broker.message_counts(QUEUE)["active"] == 2


def test_a_refused_copy_leaves_the_dead_letter_where_it_was_never_nowhere(
    broker: LocalBroker, client: ServiceBusClient
) -> None:
    """docs/operations.md: a replay interrupted by a refused send completes nothing; a later replay moves all."""
    _dead_letter(client, QUEUE, [ServiceBusMessage(_body(f"R{i}", "exp_r"), message_id=f"r{i}") for i in range(5)], "X")
    broker.refuse_sends(QUEUE, "amqp:unauthorized-access")
    try:
        outcome = replay(client, Entity.parse(QUEUE), ReplayFilter(experiment="exp_r"))
    except Exception:  # the refusal may end the command (exit 5 in the CLI): what matters is where messages are
        outcome = None
    assert outcome is None or outcome.replayed == []
    wait_for(
        lambda: broker.message_counts(QUEUE) == {**broker.message_counts(QUEUE), "active": 0, "dead_letter": 5},
        60,
        "every dead letter back in the DLQ, nothing on the queue",
    )
    broker.clear_faults()
    again = replay(client, Entity.parse(QUEUE), ReplayFilter(experiment="exp_r"))
    assert sorted(x.request["user_id"] for x in again.replayed) == [f"R{i}" for i in range(5)]
    assert broker.message_counts(QUEUE)["dead_letter"] == 0
    assert broker.message_counts(QUEUE)["active"] == 5


def test_errors_name_the_operation_and_the_entity(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 19 §3: an entity that does not exist is one line naming what was being done, and where; exit 5.

    ``queue peek`` and ``queue dead-letter`` used to say "the dead-letter command failed", and every
    refusal "could not reach Azure or the broker", though the broker had answered.
    """
    missing = "no-such-queue"
    for argv, doing in (
        (["queue", "peek"], f"peeking at the active messages of {missing} failed"),
        (
            ["queue", "dead-letter", "--message-id", "m1"],
            f"moving the message with message id 'm1' in {missing} to its dead-letter queue failed",
        ),
        (["dlq", "peek"], f"peeking at the dead letters of {missing} failed"),
        (["dlq", "export", str(tmp_path / "out.jsonl")], f"exporting the dead letters of {missing} to "),
        (["dlq", "replay", "--all"], f"replaying dead letters of {missing} failed"),
        (["dlq", "purge", "--all", "--yes"], f"purging dead letters of {missing} failed"),
    ):
        command = " ".join(argv[:2])
        assert main([*argv, "--entity", missing]) == 5, argv
        err = capsys.readouterr().err
        _one_line_error(err, command)
        assert f"ab-worker {command}: error: Azure or the broker refused the call: {doing}" in err, err
        assert "MessagingEntityNotFoundError" in err
        assert "dead-letter command" not in err


def _export_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_replay_from_a_repaired_file_says_the_originals_stay_and_purge_from_removes_exactly_those(
    broker: LocalBroker,
    client: ServiceBusClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Issue 19 §3: replay --from prints that the originals are still there and the command that removes them;
    run as printed, it removes those two and nothing else (not the third line's dead letter, not another)."""
    messages = [ServiceBusMessage(_body(f"U{i}", "exp_old"), message_id=f"m{i}") for i in range(3)]
    _dead_letter(client, QUEUE, messages, "UnknownExperiment")
    _dead_letter(client, QUEUE, [ServiceBusMessage(_body("U9", "exp_old"), message_id="m9")], "InvalidJson")
    exported = tmp_path / "dlq.jsonl"
    assert main(["dlq", "export", str(exported)]) == 0
    lines = {line["message_id"]: line for line in _export_lines(exported)}
    repaired = []
    for message_id in ("m0", "m1"):
        line = dict(lines[message_id])
        line["body"] = line["body"].replace("exp_old", "exp_new")  # the repair; body_sha256 still names the original
        repaired.append(line)
    repaired_file = _write_lines(tmp_path / "repaired file.jsonl", repaired)
    capsys.readouterr()

    assert main(["dlq", "replay", "--from", str(repaired_file)]) == 0

    err = capsys.readouterr().err
    assert f"resubmitted 2 messages from {repaired_file} to {QUEUE}" in err
    said = [line for line in err.splitlines() if line.startswith("replay --from removes nothing")]
    assert said == [
        f"replay --from removes nothing from the dead-letter queue of {QUEUE}: to remove the 2 dead letters"
        f" {repaired_file} was exported from, and only those: ab-worker dlq purge --from '{repaired_file}'"
    ]
    assert broker.message_counts(QUEUE)["dead_letter"] == 4  # the originals are still there, as it says
    command = shlex.split(said[0].split("and only those: ", 1)[1])
    assert command[0] == "ab-worker"

    assert main([*command[1:], "--dry-run"]) == 0
    assert f"would purge 2 of the 2 dead letters {repaired_file} names" in capsys.readouterr().err
    assert broker.message_counts(QUEUE)["dead_letter"] == 4
    assert main(command[1:]) == 2  # no terminal to ask on: the same rule as every purge
    _one_line_error(capsys.readouterr().err, "dlq purge")
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))

    assert main(command[1:]) == 0  # as printed, answered on a terminal

    assert f"purged 2 of the 2 dead letters {repaired_file} names, from {QUEUE}; 0 not in" in capsys.readouterr().err
    assert sorted(str(x.message_id) for x in _dlq(client, QUEUE)) == ["m2", "m9"]
    with client.get_queue_receiver(QUEUE) as receiver:
        copies = collect(lambda: receiver.receive_messages(max_message_count=2, max_wait_time=5), 2, what="2 copies")
    assert sorted(json.loads(b"".join(m.body))["experiment_id"] for m in copies) == ["exp_new", "exp_new"]

    assert main([*command[1:], "--yes"]) == 0  # again: nothing left to remove, and it says so
    assert "purged 0 of the 2 dead letters" in capsys.readouterr().err
    assert sorted(str(x.message_id) for x in _dlq(client, QUEUE)) == ["m2", "m9"]


def test_purge_from_refuses_a_dead_letter_that_is_not_the_one_exported(
    broker: LocalBroker, client: ServiceBusClient, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Same sequence number and message id but another body (the digest says so), or a hand-written line whose
    body differs with no digest to go by: skipped with the reason, exit 1, never deleted."""
    messages = [ServiceBusMessage(_body(f"U{i}", "exp"), message_id=f"m{i}") for i in range(4)]
    _dead_letter(client, QUEUE, messages, "UnknownExperiment")
    exported = tmp_path / "dlq.jsonl"
    assert main(["dlq", "export", str(exported)]) == 0
    lines = {line["message_id"]: line for line in _export_lines(exported)}
    not_the_one = {**lines["m0"], "body_sha256": hashlib.sha256(b"another body").hexdigest()}
    unchecked_repair = {key: value for key, value in lines["m1"].items() if key != "body_sha256"}
    unchecked_repair["body"] = unchecked_repair["body"].replace("U1", "U1-fixed")
    unchanged_without_digest = {key: value for key, value in lines["m2"].items() if key != "body_sha256"}
    elsewhere = {**lines["m3"], "sequence_number": 999_999}
    mixed = _write_lines(tmp_path / "mixed.jsonl", [not_the_one, unchecked_repair, unchanged_without_digest, elsewhere])
    capsys.readouterr()

    assert main(["dlq", "purge", "--from", str(mixed), "--yes"]) == 1

    err = capsys.readouterr().err
    assert f"purged 1 of the 4 dead letters {mixed} names, from {QUEUE}; 1 not in its dead-letter queue" in err
    assert "2 skipped: its body is not the one the file says was exported" in err
    assert sorted(str(x.message_id) for x in _dlq(client, QUEUE)) == ["m0", "m1", "m3"]

    assert main(["dlq", "purge", "--from", str(mixed), "--reason", "UnknownExperiment", "--yes"]) == 2
    _one_line_error(capsys.readouterr().err, "dlq purge")
    hand_written = _write_lines(tmp_path / "hand.jsonl", [{"body": "{}", "message_id": "m0"}])
    assert main(["dlq", "purge", "--from", str(hand_written), "--yes"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "dlq purge")
    assert "line 1: no field 'sequence_number'" in err
    assert sorted(str(x.message_id) for x in _dlq(client, QUEUE)) == ["m0", "m1", "m3"]
