"""Ctrl-C in ``dlq replay --rate`` (issue 19 §3): the run stops between two dead letters, says how many it
replayed of how many and how many are left, releases what it held, and exits 130.

The command runs in its own process, as it does at a terminal, against the embedded broker; the
SIGINT is sent from the test once copies went out (a condition on the broker, not a timer). The
queue's locks last 5 minutes, so a message the run held and did not release would stay locked far
longer than the test looks for it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

from adapters.local.broker import BrokerConfig, LocalBroker
from tests.waiting import collect, wait_for

pytestmark = pytest.mark.integration

QUEUE = "long-locks"
TARGETS, OTHERS = 40, 10


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """A queue whose locks outlast the test: only a release makes a held message receivable again."""
    properties = {"LockDuration": "PT5M", "MaxDeliveryCount": 10}
    config = {
        "UserConfig": {"Namespaces": [{"Name": "sbemulatorns", "Queues": [{"Name": QUEUE, "Properties": properties}]}]}
    }
    with LocalBroker(BrokerConfig.from_dict(config)) as running:
        yield running


def _fill_dead_letter_queue(client: ServiceBusClient) -> None:
    """50 dead letters in sequence order, every fifth one of another reason (held, not replayed, by the run)."""
    with client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(
            [
                ServiceBusMessage(json.dumps({"user_id": f"U{i}", "experiment_id": "exp"}), message_id=f"m{i}")
                for i in range(TARGETS + OTHERS)
            ]
        )
    with client.get_queue_receiver(QUEUE) as receiver:
        count = TARGETS + OTHERS
        for message in collect(
            lambda: receiver.receive_messages(max_message_count=count, max_wait_time=5), count, what="the requests"
        ):
            other = int(str(message.message_id)[1:]) % 5 == 0
            reason = "InvalidJson" if other else "UnknownExperiment"
            receiver.dead_letter_message(message, reason=reason, error_description="test")


def _receive_all_at_once(client: ServiceBusClient, expected: int) -> None:
    """A new receiver gets (and puts back) ``expected`` dead letters within 30 s: none is locked for 5 minutes.

    Collected to the count: a first receive that opened its link slowly comes back empty on a busy machine,
    which is not a held dead letter.
    """
    with client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver:
        got = collect(
            lambda: receiver.receive_messages(max_message_count=expected, max_wait_time=2),
            expected,
            what=f"all {expected} dead letters (one the run held and did not release stays locked for 5 minutes)",
        )
        for message in got:
            receiver.abandon_message(message)
        assert len(got) == expected


def test_ctrl_c_in_a_rated_replay_says_what_it_did_releases_what_it_held_and_exits_130(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """SIGINT once 3 copies are out: exit 130, 'replayed N of 40 selected dead letters, K left', N copies on the
    queue and K + 10 dead letters, every one of them receivable at once (released, not locked for 5 minutes)."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        _fill_dead_letter_queue(client)
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AB_WORKER_")}
        env["AB_WORKER_SERVICEBUS_CONNECTION_STRING"] = broker.connection_string
        stderr_path = tmp_path / "replay.err"
        command = [sys.executable, "-m", "worker", "dlq", "replay", "--entity", QUEUE]
        command += ["--reason", "UnknownExperiment", "--rate", "2"]  # 40 at 2 a second: 20 s if not interrupted
        with stderr_path.open("wb") as err:
            replay = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            wait_for(lambda: broker.message_counts(QUEUE)["active"] >= 3, 60, "3 copies to go out")
            replay.send_signal(signal.SIGINT)
            status = replay.wait(timeout=60)
        finally:
            if replay.poll() is None:
                replay.kill()
                replay.wait()
        stderr = stderr_path.read_text(encoding="utf-8")

        assert status == 130, stderr
        found = re.search(
            rf"interrupted: replayed (\d+) of {TARGETS} selected dead letters, (\d+) left in the dead-letter queue"
            rf" of {QUEUE}",
            stderr,
        )
        assert found, stderr
        replayed, left = int(found[1]), int(found[2])
        assert replayed >= 3
        assert left > 0
        assert replayed + left == TARGETS
        assert re.search(r"\d+ other dead letters? (was|were) held during the scan and released", stderr), stderr
        assert "Traceback" not in stderr
        counts = broker.message_counts(QUEUE)
        assert counts["active"] == replayed, "a copy went out without its dead letter being completed, or the reverse"
        assert counts["dead_letter"] == left + OTHERS
        _receive_all_at_once(client, left + OTHERS)
