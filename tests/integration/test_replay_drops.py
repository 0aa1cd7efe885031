"""A replay rides out dropped connections, and its copies are idempotent (issue 16 §4).

Real SDK against the embedded broker, the requests queue at max delivery count 1 (every burned count
would show as a dead letter) and a 5 s lock. Connections are dropped from the test's side: by the
broker at chosen points, or by the fault proxy after a fixed number of bytes on every connection.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusSubQueue

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.local.faultproxy import FaultProxy
from adapters.servicebus import ServiceBusAuth, create_client
from adapters.servicebus.dlq import DeadLetter, Entity, ReplayFilter, browse, replay, replay_message
from adapters.servicebus.dlq.connection import open_receiver
from tests.waiting import collect, wait_for
from worker.cli import main

pytestmark = [
    pytest.mark.integration,
    # The SDK abandons the sockets of the connections these tests cut: expected here.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

QUEUE = "assignment-requests"
ORIGINAL = b"ab_replay_original_message_id"


def _config(duplicate_detection: bool) -> BrokerConfig:
    properties: dict[str, Any] = {"MaxDeliveryCount": 1, "LockDuration": "PT5S"}
    if duplicate_detection:
        properties |= {"RequiresDuplicateDetection": True, "DuplicateDetectionHistoryTimeWindow": "PT10M"}
    return BrokerConfig.from_dict(
        {
            "UserConfig": {
                "Namespaces": [{"Name": "sbemulatorns", "Queues": [{"Name": QUEUE, "Properties": properties}]}]
            }
        }
    )


@pytest.fixture
def no_duplicate_detection(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBroker]:
    """A requests queue whose duplicate detection is off — as it is, in effect, once its window has passed."""
    with LocalBroker(_config(duplicate_detection=False)) as running:
        monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", running.connection_string)
        yield running


def _dead_letter(broker: LocalBroker, count: int) -> None:
    """``count`` requests, each dead-lettered once (message ids m0, m1, …)."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        with client.get_queue_sender(QUEUE) as sender:
            for start in range(0, count, 200):
                sender.send_messages(
                    [
                        ServiceBusMessage(json.dumps({"user_id": f"U{i}", "experiment_id": "exp"}), message_id=f"m{i}")
                        for i in range(start, min(count, start + 200))
                    ]
                )
        with client.get_queue_receiver(QUEUE) as receiver:
            left = [count]

            def dead_lettered() -> bool:
                for message in receiver.receive_messages(max_message_count=min(left[0], 200), max_wait_time=5):
                    receiver.dead_letter_message(message, reason="UnknownExperiment", error_description="test")
                    left[0] -= 1
                return left[0] == 0

            wait_for(dead_lettered, 120, f"the {count} requests to be dead-lettered", interval=0)


def _everything(broker: LocalBroker, sub_queue: ServiceBusSubQueue | None) -> list[ServiceBusReceivedMessage]:
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_receiver(QUEUE, sub_queue=sub_queue) as receiver,
    ):
        found: list[ServiceBusReceivedMessage] = []
        sequence = 0
        while page := receiver.peek_messages(max_message_count=250, sequence_number=sequence):
            found += page
            sequence = max(m.sequence_number or 0 for m in page) + 1
        return found


def _original(message: ServiceBusReceivedMessage) -> str:
    recorded = (message.application_properties or {}).get(ORIGINAL)
    return recorded.decode() if isinstance(recorded, bytes) else str(message.message_id)


def _census(broker: LocalBroker) -> tuple[Counter[str], set[str]]:
    """(copies on the queue per original request, originals still dead-lettered)."""
    on_queue = Counter(_original(m) for m in _everything(broker, None))
    dead = {_original(m) for m in _everything(broker, ServiceBusSubQueue.DEAD_LETTER)}
    return on_queue, dead


@pytest.mark.timeout(300)
def test_a_replay_rides_out_connections_cut_between_sending_a_copy_and_completing_its_dead_letter(
    no_duplicate_detection: LocalBroker,
) -> None:
    """200 dead letters; after every 20th is replayed the broker cuts every connection, so the next
    dead letter's completion fails after its copy was sent (the SDK's "handler has already been
    shutdown"). One run replays all 200, each exactly once, without the queue's duplicate detection."""
    broker = no_duplicate_detection
    _dead_letter(broker, 200)
    cuts: list[int] = []
    progress: list[str] = []

    def on_progress(letter: DeadLetter, what: str) -> None:
        progress.append(what)
        if what == "done" and progress.count("done") % 20 == 0 and len(cuts) < 9:
            cuts.append(broker.drop_connections())

    client = create_client(ServiceBusAuth(connection_string=broker.connection_string))
    with client:
        outcome = replay(client, Entity.parse(QUEUE), ReplayFilter(), on_progress=on_progress)

    assert len(cuts) == 9
    assert all(cuts), "a cut found no connection to drop"
    assert outcome.skipped == []
    assert len(outcome.done) == 200
    # Each cut is ridden out on a new connection, or by settling by lock token what the cut link had handed over.
    assert outcome.reconnects + outcome.by_lock_token >= 9
    on_queue, dead = _census(broker)
    assert dead == set()
    assert sorted(on_queue) == sorted(f"m{i}" for i in range(200))
    assert max(on_queue.values()) == 1, {k: n for k, n in on_queue.items() if n > 1}


@pytest.mark.timeout(240)
def test_a_rerun_after_an_interruption_sends_no_copy_that_is_already_out(
    no_duplicate_detection: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """An interrupted run left 5 dead letters whose copies wait on the queue and one whose copy came back
    to the DLQ. The re-run, past the duplicate-detection window, completes those without sending again:
    one copy per request, and the DLQ empty."""
    broker = no_duplicate_detection
    _dead_letter(broker, 20)
    entity = Entity.parse(QUEUE)
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        letters = {letter.message_id: letter for letter in browse(client, entity)}
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(replay_message(letters["m5"], entity))
        with client.get_queue_receiver(QUEUE) as receiver:  # m5's copy failed again: back in the DLQ
            (copy,) = collect(lambda: receiver.receive_messages(max_message_count=1, max_wait_time=5), 1)
            receiver.dead_letter_message(copy, reason="UnknownExperiment", error_description="again")
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages([replay_message(letters[f"m{i}"], entity) for i in range(5)])
    _, dead = _census(broker)
    assert len(dead) == 20

    assert main(["dlq", "replay", "--all"]) == 0

    on_queue, dead = _census(broker)
    assert dead == set()
    assert sorted(on_queue) == sorted(f"m{i}" for i in range(20))
    assert max(on_queue.values()) == 1, {k: n for k, n in on_queue.items() if n > 1}
    err = capsys.readouterr().err
    assert "replayed 21 of 21" in err
    assert "6 of them had a copy out already" in err


@pytest.mark.timeout(420)
def test_dlq_replay_through_connections_reset_every_40_kb_finishes_in_one_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's attack, smaller: 300 dead letters, every connection reset (RST) after 40,000 bytes,
    duplicate detection on as shipped. `dlq replay --all` exits 0 once; every request has one copy."""
    with LocalBroker(_config(duplicate_detection=True)) as broker, FaultProxy(broker.port) as proxy:
        _dead_letter(broker, 300)
        monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", proxy.connection_string(broker.connection_string))
        proxy.reset_after(40_000)

        code = main(["dlq", "replay", "--all"])

        proxy.pass_through()
        resets = proxy.stats.resets
        on_queue, dead = _census(broker)
    assert code == 0
    assert resets >= 5, "the fault hardly cut a connection"
    assert dead == set()
    assert sorted(on_queue) == sorted(f"m{i}" for i in range(300))
    assert max(on_queue.values()) == 1


@pytest.mark.timeout(300)
def test_a_dead_letter_stranded_by_a_dropped_connection_is_completed_by_lock_token_at_once() -> None:
    """Once settlement by lock token landed: the broker cuts every connection after every 15th dead letter is
    replayed (3 times), under the next one's copy or completion; the dead letters received on the cut
    connection are settled by their lock tokens over the next one, instead of coming back when their
    one-minute locks run out (which the run used to wait for, once per cut)."""
    properties = {"MaxDeliveryCount": 1, "LockDuration": "PT1M"}
    config = {
        "UserConfig": {"Namespaces": [{"Name": "sbemulatorns", "Queues": [{"Name": QUEUE, "Properties": properties}]}]}
    }
    with LocalBroker(BrokerConfig.from_dict(config)) as broker:
        _dead_letter(broker, 60)
        cuts: list[int] = []
        done: list[str] = []

        def on_progress(letter: DeadLetter, what: str) -> None:
            done.append(what)
            if what == "done" and done.count("done") % 15 == 0 and len(cuts) < 3:
                cuts.append(broker.drop_connections())

        client = create_client(ServiceBusAuth(connection_string=broker.connection_string))
        with client:
            outcome = replay(client, Entity.parse(QUEUE), ReplayFilter(), on_progress=on_progress)
        on_queue, dead = _census(broker)

    assert len(cuts) == 3
    assert all(cuts), "a cut found no connection to drop"
    assert outcome.skipped == []
    assert len(outcome.done) == 60
    assert outcome.by_lock_token >= 3, "a stranded dead letter waited for its lock to run out"
    assert outcome.lapsed == 0
    assert dead == set()
    assert sorted(on_queue) == sorted(f"m{i}" for i in range(60))
    assert max(on_queue.values()) == 1, {k: n for k, n in on_queue.items() if n > 1}


@pytest.mark.timeout(120)
def test_the_dead_letter_tools_receivers_start_no_thread_of_the_sdks_reading_their_connection(
    no_duplicate_detection: LocalBroker,
) -> None:
    """The dead-letter tools' receivers, like the worker's, start no SDK keep-alive thread.

    That thread reads the connection every 5 s beside the command's calls and its lock keeper's
    renewals; racing them it can hand a dead letter on with another's delivery tag (the SDK then logs
    ``unpack requires a buffer of 8 bytes`` or ``KeyError(<tag>)`` and shuts the handler down): a
    replay under load lost a connection that way where no connection was cut. The receiver still
    receives and settles.
    """
    broker = no_duplicate_detection
    _dead_letter(broker, 3)
    already = {thread for thread in threading.enumerate() if "_keep_alive" in thread.name}
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        open_receiver(client, Entity.parse(QUEUE)) as receiver,
    ):
        letters = collect(lambda: receiver.receive_messages(max_message_count=3, max_wait_time=5), 3)
        started = {thread for thread in threading.enumerate() if "_keep_alive" in thread.name} - already
        assert started == set(), [thread.name for thread in started]
        for letter in letters:
            receiver.complete_message(letter)
    _, dead = _census(broker)
    assert dead == set()
