"""`dlq replay` against dead letters in every legal AMQP shape: what the worker accepted, replay handles.

A replayed request keeps its original's identity whatever legal AMQP message id it arrived with.
The worker derives event ids from a request's message id; a message with no message id, or a binary
one (both legal AMQP; ``AmqpAnnotatedMessage`` sends them, as do other languages' clients), gets a
fallback identity (``seq-<n>``, ``0x<hex>``). ``dlq replay`` must carry that same identity in
``ab_replay_original_message_id``, or the replay of a request whose event already reached the topic
(``ReplyUndeliverable``) publishes a second event under a new id: a duplicate no duplicate detection
or dedup view can drop. Real SDK, embedded broker (max delivery count 1), the worker's own pump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageProperties

from adapters.local.broker import BrokerConfig, LocalBroker
from tests.integration.emulator import emulator_config, queue, run_pump, running_broker, topic
from tests.waiting import collect
from worker.cli import main
from worker.domain.registry import ExperimentRegistry
from worker.service.pump import PumpStats

pytestmark = pytest.mark.integration

WORKER = str(Path(sys.executable).with_name("ab-worker"))

QUEUE, TOPIC, REPLIES = "assignment-requests", "assignment-events", "replies"
CONFIG = emulator_config([queue(QUEUE, MaxDeliveryCount=1, LockDuration="PT30S"), queue(REPLIES)], [topic(TOPIC)])
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_001", "split": {"A": 0.5, "B": 0.5}}]})
#: user id → the AMQP message-id the request is published with (None: no message id at all). ``Any``:
#: a ulong is legal AMQP (and sent as one), though the SDK's type hint leaves it out.
MESSAGE_IDS: dict[str, Any] = {
    "U-none": None,
    "U-binary": b"\xff\x01req",
    "U-uuid": uuid.UUID("5c4b3084-d2c0-4507-827f-a31adebb1e2b"),
    "U-ulong": 12345,
    "U-text": "req-text",
}


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBroker]:
    """The embedded broker, the CLI pointed at it."""
    with running_broker(CONFIG, monkeypatch) as running:
        yield running


def _work(broker: LocalBroker, count: int) -> PumpStats:
    return run_pump(broker, REGISTRY, count)


def _events_by_user(broker: LocalBroker, count: int) -> dict[str, list[str]]:
    """Take ``count`` events off the topic's subscription: each user's event ids, in arrival order."""
    ids: dict[str, list[str]] = defaultdict(list)
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_subscription_receiver(TOPIC, "all", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r,
    ):
        for message in collect(
            lambda: r.receive_messages(max_message_count=count, max_wait_time=2), count, 100, f"{count} events"
        ):
            ids[json.loads(b"".join(message.body))["user_id"]].append(str(message.message_id))
    assert sum(map(len, ids.values())) == count
    return ids


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["from the dead-letter queue", "from an export"])
def test_a_replay_republishes_the_same_event_id_whatever_amqp_message_id_the_request_had(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str], tmp_path: Path, how: str
) -> None:
    """No id, binary, uuid, ulong and text message ids: after ReplyUndeliverable and `dlq replay --all`
    (or `dlq export` then `dlq replay --from`), each request's second event has its first event's id."""
    broker.refuse_sends(REPLIES, "amqp:not-found")
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_sender(QUEUE) as sender,
    ):
        sender.send_messages(
            [
                AmqpAnnotatedMessage(
                    data_body=json.dumps({"user_id": user, "experiment_id": "exp_001"}).encode(),
                    properties=AmqpMessageProperties(message_id=message_id, reply_to=REPLIES),
                )
                for user, message_id in MESSAGE_IDS.items()
            ]
        )
    assert _work(broker, len(MESSAGE_IDS)).dead_letters == {"ReplyUndeliverable": len(MESSAGE_IDS)}
    broker.clear_faults()
    if how == "from an export":
        exported = tmp_path / "dead-letters.jsonl"
        assert main(["dlq", "export", str(exported)]) == 0
        assert main(["dlq", "replay", "--from", str(exported)]) == 0
    else:
        assert main(["dlq", "replay", "--all"]) == 0
    capsys.readouterr()
    assert _work(broker, len(MESSAGE_IDS)).completed == len(MESSAGE_IDS)

    events = _events_by_user(broker, 2 * len(MESSAGE_IDS))

    changed = {user: ids for user, ids in events.items() if len(set(ids)) != 1}
    assert not changed, f"the replay published these requests' events under a new id: {changed}"


SHORT_LOCK_CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "sbemulatorns",
                "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 1, "LockDuration": "PT1S"}}],
                "Topics": [],
            }
        ]
    }
}


@pytest.mark.timeout(120)
def test_a_dead_letter_whose_copy_cannot_be_built_is_skipped_and_the_replay_ends() -> None:
    """Five dead letters, one with a 129-character reply session id (the worker dead-letters such a request
    as ReplyUndeliverable): `dlq replay --all` replays the four, skips the one saying why, and exits 1.
    Before, it reconnected once a lock duration for as long as it was let run (28 times in 40 s)."""
    with (
        LocalBroker(BrokerConfig.from_dict(SHORT_LOCK_CONFIG)) as broker,
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
    ):
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(
                [
                    AmqpAnnotatedMessage(
                        data_body=json.dumps({"user_id": f"U{i}", "experiment_id": "exp_001"}).encode(),
                        properties=AmqpMessageProperties(
                            message_id=f"m{i}", reply_to="r", reply_to_group_id="g" * 129 if i == 2 else None
                        ),
                    )
                    for i in range(5)
                ]
            )
        with client.get_queue_receiver(QUEUE) as receiver:
            for message in collect(
                lambda: receiver.receive_messages(max_message_count=5, max_wait_time=5), 5, what="the requests"
            ):
                receiver.dead_letter_message(message, reason="ReplyUndeliverable", error_description="test")
        assert broker.message_counts(QUEUE)["dead_letter"] == 5
        env = {**os.environ, "AB_WORKER_SERVICEBUS_CONNECTION_STRING": broker.connection_string}
        try:
            # A correct run takes a few seconds; the bound only ends one that reconnects for ever.
            run = subprocess.run(
                [WORKER, "dlq", "replay", "--all"],
                check=False,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=45,
            )
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"dlq replay never ended: {str(expired.stderr or '')[-300:]}")
        counts = broker.message_counts(QUEUE)
    assert run.returncode == 1, run.stderr
    assert (counts["active"], counts["dead_letter"]) == (4, 1)
    assert "replayed 4 of 5" in run.stderr
    assert "128" in run.stderr


@pytest.mark.timeout(60)
def test_an_export_line_whose_copy_cannot_be_built_is_named_and_nothing_is_sent(
    broker: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dlq replay --from` builds every copy before sending any: a line with a 129-character reply
    session id is named by its line number and nothing of the file goes out (before, the copies of the
    lines above it were sent and the run ended on the SDK's bare ValueError)."""
    lines = [
        {"sequence_number": 1, "message_id": "m1", "body": '{"user_id": "U1", "experiment_id": "exp_001"}'},
        {
            "sequence_number": 2,
            "message_id": "m2",
            "reply_to": REPLIES,
            "reply_to_session_id": "g" * 129,
            "body": '{"user_id": "U2", "experiment_id": "exp_001"}',
        },
    ]
    exported = tmp_path / "repaired.jsonl"
    exported.write_text("".join(json.dumps(line) + "\n" for line in lines))

    assert main(["dlq", "replay", "--from", str(exported)]) == 2

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{exported}: nothing was sent; fix line 2: its copy cannot be sent as it is" in error
    assert "128" in error
    assert broker.message_counts(QUEUE)["active"] == 0
