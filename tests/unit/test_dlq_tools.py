"""The pure parts of the dead-letter tools: replay ids and copies, escaped output, replayed identity."""

from __future__ import annotations

import hashlib
import json

import pytest

from adapters.servicebus.dlq import DeadLetter, Entity, choose_exported, replay_message, replay_message_id
from adapters.servicebus.dlq.selection import SKIP_NOT_AS_EXPORTED
from worker.cli.dlq import json_line, printable
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import REPLAY_ORIGINAL_MESSAGE_ID, event_id_for, handle
from worker.service.ports import Delivery

REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})
UNSAFE = "\x1b[2J\x07\x00\u009b\u0085\u2028\u2029\u202e\u200b"


def _letter(**changes: object) -> DeadLetter:
    letter = DeadLetter(
        sequence_number=7,
        enqueued_time=None,
        delivery_count=0,
        reason="UnknownExperiment",
        description="not configured",
        message_id="req-1",
        correlation_id="corr",
        content_type="application/json",
        body=b'{"user_id": "U", "experiment_id": "e"}',
        application_properties={"tenant": "t1"},
        subject="assign",
        reply_to="replies",
        reply_to_session_id="rs",
        time_to_live=30.0,
    )
    for name, value in changes.items():
        setattr(letter, name, value)
    return letter


def test_replay_ids_are_new_deterministic_and_bounded() -> None:
    """Same inputs, same id; another count, body or kind, another id; never the original; at most 128 chars."""
    first = replay_message_id("req-1", 1, b"x")
    assert first == replay_message_id("req-1", 1, b"x")
    assert first != "req-1"
    others = {
        replay_message_id("req-1", 2, b"x"),
        replay_message_id("req-1", 1, b"y"),
        replay_message_id("req-1", 1, b"x", "file-replay"),
    }
    assert first not in others
    assert len(others) == 3
    assert len(replay_message_id("r" * 128, 1, b"x")) <= 128


def test_replay_copy_keeps_addressing_and_records_the_original() -> None:
    """The copy keeps reply_to, subject, correlation, TTL and properties; a second replay keeps the first id."""
    copy = replay_message(_letter(), Entity.parse("q"))
    assert (copy.reply_to, copy.subject, copy.correlation_id, copy.reply_to_session_id) == (
        "replies",
        "assign",
        "corr",
        "rs",
    )
    assert copy.time_to_live is not None
    assert copy.time_to_live.total_seconds() == 30
    props = copy.application_properties or {}
    assert props["tenant"] == "t1"
    assert props[REPLAY_ORIGINAL_MESSAGE_ID] == "req-1"
    assert copy.message_id != "req-1"
    again = _letter(message_id=copy.message_id, application_properties=dict(props))
    second = replay_message(again, Entity.parse("q"))
    assert (second.application_properties or {})[REPLAY_ORIGINAL_MESSAGE_ID] == "req-1"
    assert (second.application_properties or {})["ab_replay_count"] == 2
    assert second.message_id not in {copy.message_id, "req-1"}


def test_a_replayed_request_keeps_its_original_event_id() -> None:
    """Events of a replayed copy carry the ids the original would have had, so none is duplicated."""
    body = json.dumps({"user_id": "U", "experiment_id": "exp_001"}).encode()
    original = handle(Delivery(body=body, message_id="req-1"), REGISTRY).events[0]
    copy = Delivery(
        body=body,
        message_id="req-1/replay-1-abc",
        application_properties={REPLAY_ORIGINAL_MESSAGE_ID: "req-1"},
    )
    replayed = handle(copy, REGISTRY).events[0]
    assert replayed.event_id == original.event_id == event_id_for("req-1")
    assert replayed.correlation_id == original.correlation_id


@pytest.mark.parametrize("value", [UNSAFE, "José\\x1b", "plain"])
def test_printable_escapes_every_control_and_format_character(value: str) -> None:
    """No character a terminal acts on survives, and ordinary text is left alone."""
    shown = printable(value)
    assert all(ch.isprintable() for ch in shown)
    assert shown.count("\n") == 0
    if value == "plain":
        assert shown == "plain"


def test_printable_keeps_letters_and_marks_escapes() -> None:
    """Accented letters stay; ESC reads as \\x1b, a bidi override as \\u202e."""
    assert printable("José\x1b[31m\u202e") == "José\\x1b[31m\\u202e"


def test_json_line_is_one_safe_line_that_round_trips() -> None:
    """U+2028/U+2029/U+0085 and C1 controls are JSON-escaped, so splitlines() and terminals see one plain line."""
    value = {"body": f"a{UNSAFE}b", "name": "José"}
    line = json_line(value)
    assert len(line.splitlines()) == 1
    assert all(ch.isprintable() for ch in line)
    assert "José" in line
    assert json.loads(line) == value


def test_dlq_times_take_the_same_ages_as_report() -> None:
    """``--since 1w`` works for the dlq commands as it does for report."""
    from datetime import UTC, datetime, timedelta

    from worker.cli.dlq import parse_time

    since = parse_time("1w", "--since")
    assert since is not None
    assert abs((datetime.now(UTC) - since) - timedelta(weeks=1)) < timedelta(minutes=1)


def test_an_export_line_carries_the_exported_bodys_digest_and_a_repair_keeps_it() -> None:
    """to_json writes body_sha256; from_json reads it back as what was exported, whatever the body is now."""
    line = _letter().to_json()
    assert line["body_sha256"] == hashlib.sha256(_letter().body).hexdigest()
    repaired = DeadLetter.from_json({**line, "body": '{"user_id": "U", "experiment_id": "fixed"}'})
    assert repaired.exported_sha256 == line["body_sha256"]
    assert repaired.body_sha256 != line["body_sha256"]
    with pytest.raises(ValueError, match="body_sha256"):
        DeadLetter.from_json({**line, "body_sha256": "not a digest"})


def test_purge_from_a_file_chooses_exactly_the_dead_letters_it_names() -> None:
    """Sequence number and message id both, and the body as exported; anything else is left (and said why)."""
    dlq = [
        _letter(sequence_number=1, message_id="a"),
        _letter(sequence_number=2, message_id="b", body=b'{"changed": true}'),
        _letter(sequence_number=3, message_id="c"),
        _letter(sequence_number=4, message_id="d"),
        _letter(sequence_number=5, message_id="e", body=b"{}"),
    ]
    exported = [DeadLetter.from_json(letter.to_json()) for letter in dlq[:3]]
    exported[0].body = b'{"repaired": true}'  # a repair: the digest still names what was exported
    exported[1] = DeadLetter.from_json(_letter(sequence_number=2, message_id="b").to_json())  # another body
    exported.append(DeadLetter.from_json(_letter(sequence_number=4, message_id="other").to_json()))  # wrong id
    exported.append(DeadLetter.from_json(_letter(sequence_number=6, message_id="f").to_json()))  # not there
    unverifiable = {k: v for k, v in dlq[4].to_json().items() if k != "body_sha256"}
    exported.append(DeadLetter.from_json({**unverifiable, "body": '{"repaired": 1}'}))  # no digest, body changed

    found = choose_exported(dlq, exported)

    assert [x.message_id for x in found.targets] == ["a", "c"]
    assert [(x.message_id, why) for x, why in found.skipped] == [
        ("b", SKIP_NOT_AS_EXPORTED),
        ("e", SKIP_NOT_AS_EXPORTED),
    ]
    assert sorted((x.sequence_number, x.message_id) for x in found.not_found) == [(4, "other"), (6, "f")]
    assert found.scanned == 5
