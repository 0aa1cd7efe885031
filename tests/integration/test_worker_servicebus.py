"""The worker end to end through the real azure-servicebus SDK against the embedded broker."""

from __future__ import annotations

import gc
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

from adapters.experiments import ReloadingRegistry
from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.memory import MemorySink
from adapters.servicebus import ServiceBusAuth, ServiceBusSource, create_client, send_requests
from schemas import SCHEMA_VERSION
from tests.integration.emulator import emulator_config, queue, running_broker
from tests.waiting import collect, wait_for
from worker import ExperimentRegistry
from worker.bootstrap import bootstrap
from worker.cli import main
from worker.service.handling import event_id_for
from worker.service.pump import Pump, PumpConfig, settled
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC, REPLIES = "assignment-requests", "assignment-events", "replies"
CONFIG = emulator_config(
    [queue(QUEUE, MaxDeliveryCount=10, LockDuration="PT30S"), queue(REPLIES)],
    [
        {
            "Name": TOPIC,
            "Properties": {"RequiresDuplicateDetection": True},
            "Subscriptions": [
                {"Name": "all"},
                {
                    "Name": "tone-only",
                    "Rules": [
                        {
                            "Name": "tone",
                            "Properties": {
                                "FilterType": "Sql",
                                "SqlFilter": {"SqlExpression": "experiment_id = 'exp_tone'"},
                            },
                        }
                    ],
                },
            ],
        }
    ],
)
EXPERIMENTS = {
    "experiments": [
        {"id": "exp_001", "split": {"A": 0.5, "B": 0.5}},
        {"id": "exp_tone", "split": {"calm": 0.5, "urgent": 0.5}, "variants": {"urgent": {"tone": "urgent"}}},
    ]
}


@pytest.fixture
def broker():
    with running_broker(CONFIG) as running:
        yield running


def _request(user: str, experiment: str = "exp_001", **extra: object) -> bytes:
    return json.dumps({"user_id": user, "experiment_id": experiment, **extra}).encode()


_CLIENTS: list = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def _pump(connection_string: str, registry=None, sink=None, **config) -> Pump:
    client = create_client(ServiceBusAuth(connection_string=connection_string), retry_total=1, retry_backoff_max=1)
    _CLIENTS.append(client)
    return bootstrap(
        WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC, prefetch=50),
        client=client,
        sink=sink or MemorySink(max_rows=50),
        registry=registry or (lambda: ExperimentRegistry.from_dict(EXPERIMENTS)),
        config=PumpConfig(max_wait=0.5, min_backoff=0.05, max_backoff=0.5, **config),
    )


def _drain(client: ServiceBusClient, topic: str, subscription: str, expected: int):
    """At least ``expected`` events from the subscription (completed as read); fails if fewer come."""
    with client.get_subscription_receiver(topic, subscription) as receiver:

        def take():
            batch = receiver.receive_messages(max_message_count=100, max_wait_time=1)
            for message in batch:
                receiver.complete_message(message)
            return batch

        return collect(take, expected, what=f"{expected} events on {topic}/{subscription}")


def _dead_letters(client: ServiceBusClient, queue: str = QUEUE, expected: int = 1):
    """At least ``expected`` dead letters of ``queue`` (completed as read); fails if fewer come."""
    with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver:
        messages = collect(
            lambda: receiver.receive_messages(max_message_count=50, max_wait_time=1),
            expected,
            what=f"{expected} dead letters of {queue}",
        )
        for message in messages:
            receiver.complete_message(message)
        return messages


def test_happy_path_and_every_dead_letter_reason(broker):
    """Requests published with the SDK become events on the topic; each poison lands in the DLQ with its reason."""
    good = [_request(f"U{i}", "exp_tone" if i % 2 else "exp_001") for i in range(40)]
    bad = {
        "InvalidJson": b"\xff not json",
        "SchemaValidationFailed": json.dumps({"experiment_id": "exp_001"}).encode(),
        "UnknownExperiment": _request("U1", "exp_missing"),
        "MessageTooLarge": b'{"user_id": "' + b"x" * 70_000 + b'"}',
    }
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        ids = [f"req-{i}" for i in range(len(good))]
        send_requests(client, QUEUE, good, message_ids=ids)
        send_requests(client, QUEUE, list(bad.values()))
        stats = _pump(broker.connection_string).run(until=settled(len(good) + len(bad)))
        events = _drain(client, TOPIC, "all", expected=40)
        tone_only = _drain(client, TOPIC, "tone-only", expected=20)
        dead = _dead_letters(client, expected=len(bad))
    assert stats.completed == 40
    assert {event_id_for(i) for i in ids} == {str(m.message_id) for m in events}
    sample = events[0]
    assert sample.content_type == "application/json"
    body = json.loads(b"".join(sample.body))
    assert body["event_id"] == str(sample.message_id)
    props = {k.decode(): v.decode() for k, v in sample.application_properties.items()}
    assert props == {
        "event_type": "assignment",
        "experiment_id": body["experiment_id"],
        "variant_id": body["variant_id"],
        "schema_version": SCHEMA_VERSION,
    }
    assert len(tone_only) == 20
    assert all(json.loads(b"".join(m.body))["experiment_id"] == "exp_tone" for m in tone_only)
    assert sorted(m.dead_letter_reason for m in dead) == sorted(bad)
    too_large = next(m for m in dead if m.dead_letter_reason == "MessageTooLarge")
    assert "limit is 65536" in too_large.dead_letter_error_description
    assert broker.message_counts(QUEUE)["active"] == 0


def test_reply_to_receives_the_event(broker):
    """A request with reply_to gets its own event on that queue (request/reply pattern)."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(ServiceBusMessage(_request("U123"), message_id="ask-1", reply_to=REPLIES))
        _pump(broker.connection_string).run(until=settled(1))
        with client.get_queue_receiver(REPLIES) as receiver:
            (reply,) = collect(
                lambda: receiver.receive_messages(max_message_count=5, max_wait_time=5), 1, what="the reply"
            )
            receiver.complete_message(reply)
    event = json.loads(b"".join(reply.body))
    assert (event["user_id"], event["variant_id"], event["hash_value"]) == ("U123", "A", 0.002099)
    assert reply.correlation_id == "ask-1"


def test_traceparent_and_correlation_id_flow_through(broker):
    """The event's correlation id is the request's correlation id when it has one."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(ServiceBusMessage(_request("U1"), message_id="m-1", correlation_id="order-77"))
        _pump(broker.connection_string).run(until=settled(1))
        (event,) = _drain(client, TOPIC, "all", expected=1)
    assert event.correlation_id == "order-77"


def test_redelivered_request_is_dropped_by_duplicate_detection(broker):
    """The same request twice yields one event on the topic: same deterministic id, duplicate detection drops it."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, [_request("U1"), _request("U1")], message_ids=["same", "same"])
        stats = _pump(broker.connection_string).run(until=settled(2))
        # Both are published once settled: the subscription holds what duplicate detection let through.
        assert broker.message_counts(f"{TOPIC}/Subscriptions/all")["active"] == 1
        events = _drain(client, TOPIC, "all", expected=1)
    assert stats.completed == 2
    assert [str(m.message_id) for m in events] == [event_id_for("same")]


def _short_lock_config(lock: str = "PT3S") -> dict:
    config = json.loads(json.dumps(CONFIG))
    config["UserConfig"]["Namespaces"][0]["Queues"][0]["Properties"]["LockDuration"] = lock
    return config


def _felt(pump: Pump) -> bool:
    """True once the pump has counted a failure of the broker (receive, settlement or publish)."""
    return pump.stats.receive_failures + pump.stats.settlement_lost + pump.stats.downstream_retries > 0


# The SDK (pyamqp) leaves the socket of a connection the broker dropped for the garbage collector;
# collect it inside the test so the resulting ResourceWarning is attributed here and ignored, not
# reported at session end.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_broker_restart_mid_run_loses_nothing():
    """The broker stops and comes back on the same port with its state; the worker resumes by itself."""
    total = 300
    ids = [f"r-{i}" for i in range(total)]
    # Locks held by the dead connection lapse after the lock duration, as on Service Bus: keep it short.
    broker = LocalBroker(BrokerConfig.from_dict(_short_lock_config())).start()
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, [_request(f"U{i}") for i in range(total)], message_ids=ids)
    pump = _pump(broker.connection_string, max_batch=20)
    thread = threading.Thread(target=pump.run)
    thread.start()
    wait_for(lambda: pump.stats.completed >= 60, what="60 completions")
    port, state = broker.port, broker.state
    broker.stop()
    # The broker stays away until the worker has felt it (not for a while and hope it noticed).
    wait_for(lambda: _felt(pump), what="the worker to feel the broker gone")
    with LocalBroker(BrokerConfig.from_dict(_short_lock_config()), port=port, state=state) as again:
        # Stopped once the queue is empty, not after an idle window that races the lapse of the locks
        # the dead connection held ("active" counts locked messages too).
        wait_for(lambda: again.message_counts(QUEUE)["active"] == 0, 90, "the worker to empty the queue")
        pump.stop()
        thread.join(timeout=90)
        assert not thread.is_alive()
        with ServiceBusClient.from_connection_string(again.connection_string) as client:
            events = _drain(client, TOPIC, "all", expected=total)
        assert again.message_counts(QUEUE)["active"] == 0
        assert again.message_counts(QUEUE)["dead_letter"] == 0
    assert {str(m.message_id) for m in events} == {event_id_for(i) for i in ids}
    # The fault was felt: a failed receive, publish or settlement, or (since messages from the lost
    # link are settled by lock token on the new one) settlements by lock token.
    felt = pump.stats.receive_failures + pump.stats.settlement_lost + pump.stats.downstream_retries
    assert felt + pump.source.settled_by_token > 0  # type: ignore[attr-defined]
    _CLIENTS.pop().close()
    gc.collect()


def test_unknown_experiment_hot_reload_then_replay(broker, tmp_path, monkeypatch, capsys):
    """Requests for an unconfigured experiment are dead-lettered; after the config is added, dlq replay assigns them."""
    config = tmp_path / "experiments.json"
    config.write_text(json.dumps({"experiments": [EXPERIMENTS["experiments"][0]]}), encoding="utf-8")
    registry = ReloadingRegistry(config, interval=0.05)
    monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", broker.connection_string)
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, [_request(f"N{i}", "exp_new") for i in range(5)] + [_request("U1")])
        first = _pump(broker.connection_string, registry=registry.current).run(until=settled(6))
        assert first.dead_letters == {"UnknownExperiment": 5}

        assert main(["dlq", "peek", "--summary"]) == 0
        assert "5  UnknownExperiment" in capsys.readouterr().out
        assert main(["dlq", "replay", "--reason", "UnknownExperiment", "--dry-run"]) == 0
        assert broker.message_counts(QUEUE)["dead_letter"] == 5, "a dry run moves nothing"

        new = {"id": "exp_new", "split": {"x": 0.5, "y": 0.5}}
        config.write_text(json.dumps({"experiments": [EXPERIMENTS["experiments"][0], new]}), encoding="utf-8")
        wait_for(lambda: registry.current().get("exp_new") is not None, what="the registry to reload")
        assert main(["dlq", "replay", "--reason", "UnknownExperiment"]) == 0
        assert broker.message_counts(QUEUE)["dead_letter"] == 0
        second = _pump(broker.connection_string, registry=registry.current).run(until=settled(5))
        events = _drain(client, TOPIC, "all", expected=6)
    assert second.completed == 5
    assert second.dead_letters == {}
    assert sorted(json.loads(b"".join(m.body))["user_id"] for m in events if b"exp_new" in b"".join(m.body)) == [
        f"N{i}" for i in range(5)
    ]


def test_dlq_export_and_replay_from_file(broker, tmp_path, monkeypatch):
    """Export writes body and properties; a hand-repaired export resubmits and is then assigned."""
    monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", broker.connection_string)
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, [json.dumps({"user": "typo", "experiment_id": "exp_001"}).encode()])
        _pump(broker.connection_string).run(until=settled(1))
        exported = tmp_path / "dlq.jsonl"
        assert main(["dlq", "export", str(exported)]) == 0
        (line,) = [json.loads(x) for x in exported.read_text().splitlines()]
        assert line["dead_letter_reason"] == "SchemaValidationFailed"
        assert "user_id: Field required" in line["dead_letter_error_description"]
        line["body"] = json.dumps({"user_id": "fixed", "experiment_id": "exp_001"})
        repaired = tmp_path / "repaired.jsonl"
        repaired.write_text(json.dumps(line) + "\n", encoding="utf-8")
        assert main(["dlq", "replay", "--from", str(repaired)]) == 0
        stats = _pump(broker.connection_string).run(until=settled(1))
        events = _drain(client, TOPIC, "all", expected=1)
    assert stats.completed == 1
    assert json.loads(b"".join(events[0].body))["user_id"] == "fixed"


def test_replay_skips_messages_replayed_too_often(broker, monkeypatch):
    """A message already replayed --max-replays times stays in the DLQ with a warning."""
    monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", broker.connection_string)
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(
                ServiceBusMessage(_request("U", "exp_missing"), application_properties={"ab_replay_count": 5})
            )
        _pump(broker.connection_string).run(until=settled(1))
    assert main(["dlq", "replay", "--reason", "UnknownExperiment"]) == 1
    assert broker.message_counts(QUEUE)["dead_letter"] == 1


def test_lock_keeper_renews_locks_while_rows_wait(broker):
    """Messages held past their lock duration (slow flush) are renewed, not redelivered."""
    # Service Bus's shortest lock; renewals start 1 s in, leaving the keeper 4 s of slack on a busy machine.
    lock = 5.0
    with LocalBroker(BrokerConfig.from_dict(_short_lock_config("PT5S"))) as short:
        with ServiceBusClient.from_connection_string(short.connection_string) as client:
            send_requests(client, QUEUE, [_request(f"U{i}") for i in range(5)])

        class SlowSink(MemorySink):
            def flush(self) -> None:
                # Holds the rows past the lock duration: a lower bound on the hold, however slow the machine.
                time.sleep(lock + 1)
                super().flush()

        pump = _pump(short.connection_string, sink=SlowSink())
        source = pump.source
        assert isinstance(source, ServiceBusSource)
        source.locks.margin = lock - 1
        source.locks.interval = 0.2
        stats = pump.run(until=settled(5))
        assert stats.completed == 5
        assert stats.settlement_lost == 0
        assert source.locks.renewals >= 5
        assert short.message_counts(QUEUE)["active"] == 0


def test_run_local_demo_command(capsys, monkeypatch):
    """`ab-worker run --local --demo --drain` (the README's main command) shows events and a summary."""
    monkeypatch.setenv("AB_WORKER_HEALTH_PORT", "0")
    repo = Path(__file__).parents[2]
    code = main(["run", "--config", str(repo / "deploy" / "experiments.yaml"), "--local", "--demo", "--drain"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "event  U" in out
    assert "1101 events read back" in out
    assert "UnknownExperiment" in out
    assert "processed 1105 requests: 1101 assigned, 4 dead-lettered" in err
    # The README's numbers for the plain experiments, and the allocation experiments' users by reason.
    assert any(line.startswith("exp_001 ") and "59   40.7%" in line for line in out.splitlines())
    outside = next(line for line in out.splitlines() if "not in it" in line and "override 1" in line)
    assert all(reason in outside for reason in ("targeting", "layer", "coverage", "holdout"))
    assert "{" not in err.strip().splitlines()[-1]  # reasons as text, not a Python dict
    assert (out + err).count("listening on 127.0.0.1") == 1
    assert "target" in out
    assert "p=" in out
    # Its broker is gone: the next steps say how to keep one, and suggest no report of rows nobody wrote.
    assert "The embedded broker stopped with this run, and its 4 dead letters with it" in out
    assert "`make broker`" in out
    assert "report --rows" not in out


def test_uuid_message_ids_survive(broker):
    """Message ids of any shape map to a stable event id."""
    message_id = str(uuid.uuid4())
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, [_request("U9")], message_ids=[message_id])
        _pump(broker.connection_string).run(until=settled(1))
        (event,) = _drain(client, TOPIC, "all", expected=1)
    assert str(event.message_id) == event_id_for(message_id)


def test_cohort_message_end_to_end(broker):
    """A cohort request published with the SDK yields one event per member plus a passing report on the topic."""
    segments = {"High-Value Recent": 84, "Standard": 145, "New Customer": 21}
    members = [
        {"member_id": f"{name[:2]}{i:03d}", "segment": name} for name, count in segments.items() for i in range(count)
    ]
    arms = [{"id": arm} for arm in ("control", "treatment_1", "treatment_2", "treatment_3")]
    body = json.dumps({"kind": "cohort", "experiment_id": "email-tone", "arms": arms, "members": members}).encode()
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, [body], message_ids=["cohort-250"])
        stats = _pump(broker.connection_string, max_body_bytes=65536).run(until=settled(1))
        events = _drain(client, TOPIC, "all", expected=251)
    assert stats.completed == 1
    kinds = [m.application_properties[b"event_type"] for m in events]
    assert kinds.count(b"assignment") == 250
    (report,) = [
        json.loads(b"".join(m.body)) for m in events if m.application_properties[b"event_type"] != b"assignment"
    ]
    assert report["passed"] is True
    assert report["member_count"] == 250
    per_arm: dict[str, int] = {}
    for message in events:
        event = json.loads(b"".join(message.body))
        if event.get("experiment_arm"):
            per_arm[event["experiment_arm"]] = per_arm.get(event["experiment_arm"], 0) + 1
    assert per_arm == {"control": 64, "treatment_1": 62, "treatment_2": 62, "treatment_3": 62}
