"""Allocation in the worker end to end: the real azure-servicebus SDK against the embedded broker.

Plain experiments stay bit-exact; the decision time is the broker's enqueued time, so an experiment
whose ``start_at`` falls between two requests splits them the same way on every redelivery, with
byte-identical events; targeting reads the whole context while nothing personal leaves the worker;
hostile contexts are decided or dead-lettered with a reason, never a crash.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters.local.broker import BrokerConfig, LocalBroker
from adapters.memory import MemorySink
from adapters.servicebus import ServiceBusAuth, create_client, send_requests
from tests.integration.emulator import dead_letters
from tests.waiting import collect, wait_for
from worker import ABAssignmentAgent, ExperimentRegistry
from worker.bootstrap import bootstrap
from worker.service.handling import event_id_for
from worker.service.pump import Pump, PumpConfig, settled
from worker.service.settings import WorkerSettings

pytestmark = pytest.mark.integration

QUEUE, TOPIC, SUBSCRIPTION = "assignment-requests", "assignment-events", "all"
ALL = f"{TOPIC}/Subscriptions/{SUBSCRIPTION}"
DEMO = ExperimentRegistry.load(Path(__file__).parents[2] / "deploy" / "experiments.yaml")


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """Requests queue, and a topic WITHOUT duplicate detection: a redelivery's duplicate reaches the subscription."""
    config = {
        "UserConfig": {
            "Namespaces": [
                {
                    "Name": "sbemulatorns",
                    "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 10, "LockDuration": "PT30S"}}],
                    "Topics": [
                        {
                            "Name": TOPIC,
                            "Properties": {"RequiresDuplicateDetection": False},
                            "Subscriptions": [{"Name": SUBSCRIPTION}],
                        }
                    ],
                }
            ]
        }
    }
    with LocalBroker(BrokerConfig.from_dict(config)) as running:
        yield running


def _pump(broker: LocalBroker, clients: list[Any], registry: ExperimentRegistry, **options: Any) -> Pump:
    """The real pump on the real SDK adapters (``sink``, ``tracer_provider``, ``allow`` optional)."""
    client = create_client(ServiceBusAuth(connection_string=broker.connection_string), retry_total=1)
    clients.append(client)
    return bootstrap(
        WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC, prefetch=50),
        client=client,
        sink=options.get("sink") or MemorySink(max_rows=50),
        registry=lambda: registry,
        tracer_provider=options.get("tracer_provider"),
        config=PumpConfig(
            max_wait=0.5,
            min_backoff=0.05,
            max_backoff=0.2,
            context_allow_list=frozenset(options.get("allow", ())),
        ),
    )


def _publish(broker: LocalBroker, bodies: Sequence[dict[str, Any] | bytes], ids: Sequence[str] | None = None) -> None:
    raw = [body if isinstance(body, bytes) else json.dumps(body).encode() for body in bodies]
    with ServiceBusClient.from_connection_string(broker.connection_string) as client:
        send_requests(client, QUEUE, raw, message_ids=list(ids) if ids else None)


def _events(broker: LocalBroker, expected: int) -> dict[str, list[bytes]]:
    """Every event on the subscription (removed as read), by message id, in arrival order; fails when short."""
    events: dict[str, list[bytes]] = defaultdict(list)
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_subscription_receiver(
            TOPIC, SUBSCRIPTION, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE, prefetch_count=200
        ) as receiver,
    ):
        for message in collect(
            lambda: receiver.receive_messages(max_message_count=200, max_wait_time=0.5), expected, what="the events"
        ):
            events[str(message.message_id)].append(b"".join(message.body))
    assert sum(map(len, events.values())) == expected, f"{sum(map(len, events.values()))} events, not {expected}"
    return events


def _enqueued(broker: LocalBroker, count: int) -> dict[str, datetime]:
    """The broker's enqueued time of each active request, by message id (peeked: nothing is locked)."""
    with (
        ServiceBusClient.from_connection_string(broker.connection_string) as client,
        client.get_queue_receiver(QUEUE) as receiver,
    ):
        peeked = receiver.peek_messages(max_message_count=count)
    return {str(m.message_id): m.enqueued_time_utc for m in peeked if m.enqueued_time_utc is not None}


# -- bit-exact ------------------------------------------------------------------------------------


def test_plain_experiments_assign_exactly_as_the_seed_rule_through_the_sdk(broker: LocalBroker, clients: list) -> None:
    """The demo's plain experiments: variant, hash_value and threshold of ``ABAssignmentAgent``, in_experiment."""
    bodies: list[dict[str, Any]] = []
    for index in range(240):
        experiment = ("exp_001", "exp_personalization_001", "exp_tone_abcd")[index % 3]
        body: dict[str, Any] = {"user_id": f"P{index}", "experiment_id": experiment}
        if experiment == "exp_personalization_001":
            segment = (None, "high_intent", "low_intent", "standard")[index % 4]
            if segment and index % 8 < 4:
                body["segment"] = segment
            elif segment:
                body["context"] = {"segment": segment}
        bodies.append(body)
    ids = [f"plain-{i}" for i in range(len(bodies))]
    _publish(broker, bodies, ids)
    sink = MemorySink(max_rows=50)
    stats = _pump(broker, clients, DEMO, sink=sink).run(until=settled(len(bodies)))
    assert stats.completed == len(bodies)
    events = _events(broker, len(bodies))
    rows = {row.EventId: row for row in sink.rows}
    for message_id, body in zip(ids, bodies, strict=True):
        (raw,) = events[event_id_for(message_id)]
        event = json.loads(raw)
        configured = DEMO.get(body["experiment_id"])
        assert configured is not None
        segment = body.get("segment") or body.get("context", {}).get("segment")
        agent = ABAssignmentAgent(dict(configured.split_for(segment)), seed=configured.config.seed)
        expected = agent.assign_user(body["user_id"], body["experiment_id"])
        assert (event["variant_id"], event["hash_value"], tuple(event["threshold"])) == (
            expected["variant_id"],
            expected["hash_value"],
            expected["threshold"],
        )
        assert (event["in_experiment"], event["reason"]) == (True, "bucketed")
        assert event["config_version"] == configured.allocation.config_version
        row = rows[event["event_id"]]
        assert (row.InExperiment, row.Reason, row.ConfigVersion, row.HashValue) == (
            True,
            "bucketed",
            event["config_version"],
            event["hash_value"],
        )


# -- the decision time ----------------------------------------------------------------------------


def test_start_at_between_two_requests_decides_by_enqueued_time_and_redelivers_byte_identically(
    broker: LocalBroker, clients: list
) -> None:
    """A request enqueued before start_at is not_started, one enqueued after is bucketed, though both are handled
    after start_at; a redelivery (its first events published, its rows never durable) re-decides both to the byte."""
    _publish(broker, [{"user_id": "U-early", "experiment_id": "launch"}], ["early"])
    first_enqueued = _enqueued(broker, 1)["early"]
    start_at = first_enqueued + timedelta(milliseconds=1)
    registry = ExperimentRegistry.from_dict(
        {
            "experiments": [
                {"id": "launch", "split": {"control": 0.5, "blue": 0.5}, "start_at": start_at.isoformat()},
            ]
        }
    )
    wait_for(lambda: datetime.now(UTC) > start_at + timedelta(milliseconds=5), what="start_at to pass")
    _publish(broker, [{"user_id": "U-late", "experiment_id": "launch"}], ["late"])
    enqueued = _enqueued(broker, 2)
    assert enqueued["early"] < start_at <= enqueued["late"], enqueued

    # First pass: events reach the topic, rows never become durable; stopping releases both requests.
    never = MemorySink(failures_left=1_000_000)
    first = _pump(broker, clients, registry, sink=never)
    thread = threading.Thread(target=first.run, daemon=True)
    thread.start()
    wait_for(
        lambda: broker.message_counts(ALL)["active"] >= 2 and first.stats.downstream_retries >= 1,
        what="both events published and the sink failing",
    )
    first.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()
    wait_for(lambda: broker.message_counts(QUEUE)["active"] == 2, what="the two requests back on the queue")

    # Second pass, later still: the same decisions, the same bytes.
    sink = MemorySink(max_rows=10)
    second = _pump(broker, clients, registry, sink=sink).run(until=settled(2))
    assert second.completed == 2
    events = _events(broker, 4)
    early, late = events[event_id_for("early")], events[event_id_for("late")]
    assert len(early) == len(late) == 2
    assert early[0] == early[1], "the redelivered request's event differs"
    assert late[0] == late[1], "the redelivered request's event differs"
    early_event, late_event = json.loads(early[0]), json.loads(late[0])
    assert (early_event["reason"], early_event["in_experiment"], early_event["variant_id"]) == (
        "not_started",
        False,
        "control",
    )
    assert (early_event["hash_value"], early_event["threshold"]) == (None, None)
    assert datetime.fromisoformat(early_event["assigned_at"]) == first_enqueued
    assert (late_event["reason"], late_event["in_experiment"]) == ("bucketed", True)
    assert late_event["hash_value"] is not None
    assert {row.EventId: row.Reason for row in sink.rows} == {
        event_id_for("early"): "not_started",
        event_id_for("late"): "bucketed",
    }


def test_a_replay_is_decided_at_its_original_enqueued_time(
    broker: LocalBroker, clients: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request dead-lettered before its experiment existed, replayed after the experiment's start_at:
    the replayed copy is enqueued after start_at, yet decided at the original's enqueued time."""
    from worker.cli import main

    _publish(broker, [{"user_id": "U-first", "experiment_id": "launch"}], ["first"])
    original = _enqueued(broker, 1)["first"]
    unknown = ExperimentRegistry.from_dict({"experiments": [{"id": "other", "split": {"A": 1.0}}]})
    assert _pump(broker, clients, unknown).run(until=settled(1)).dead_letters == {"UnknownExperiment": 1}
    start_at = original + timedelta(milliseconds=1)
    registry = ExperimentRegistry.from_dict(
        {"experiments": [{"id": "launch", "split": {"control": 0.5, "blue": 0.5}, "start_at": start_at.isoformat()}]}
    )
    wait_for(lambda: datetime.now(UTC) > start_at + timedelta(milliseconds=5), what="start_at to pass")
    monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", broker.connection_string)
    assert main(["dlq", "replay", "--reason", "UnknownExperiment"]) == 0
    copy = _enqueued(broker, 1)
    assert all(when > start_at for when in copy.values()), copy
    assert _pump(broker, clients, registry).run(until=settled(1)).completed == 1
    (raws,) = _events(broker, 1).values()
    event = json.loads(raws[0])
    assert (event["event_id"], event["reason"], event["in_experiment"]) == (event_id_for("first"), "not_started", False)
    assert datetime.fromisoformat(event["assigned_at"]) == original


# -- privacy --------------------------------------------------------------------------------------


def test_targeting_on_email_puts_no_email_in_events_rows_spans_or_logs(
    broker: LocalBroker, clients: list, caplog: pytest.LogCaptureFixture
) -> None:
    """Targeting reads the e-mail inside the worker; events, rows, spans and logs carry only allow-listed keys."""
    registry = ExperimentRegistry.from_dict(
        {
            "experiments": [
                {
                    "id": "vip_offer",
                    "split": {"control": 0.5, "offer": 0.5},
                    "targeting": {"email": {"$in": ["vip1@example.com", "vip2@example.com"]}},
                },
            ]
        }
    )
    bodies = [
        {
            "user_id": f"E{index}",
            "experiment_id": "vip_offer",
            "context": {
                "email": f"vip{index % 2 + 1}@example.com" if index % 3 == 0 else f"person{index}@example.com",
                "campaign": "spring",
            },
        }
        for index in range(60)
    ]
    bodies.append({"user_id": "E-unknown", "experiment_id": "not_here", "context": {"email": "lost@example.com"}})
    _publish(broker, bodies)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = MemorySink(max_rows=50)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="worker")
    caplog.set_level(logging.DEBUG, logger="adapters")
    stats = _pump(broker, clients, registry, sink=sink, tracer_provider=provider, allow=("campaign",)).run(
        until=settled(len(bodies))
    )
    assert stats.completed == 60
    events = [json.loads(raw) for raws in _events(broker, 60).values() for raw in raws]
    reasons = {event["user_id"]: event["reason"] for event in events}
    assert {reasons[f"E{i}"] for i in range(0, 60, 3)} == {"bucketed"}
    assert {reasons[f"E{i}"] for i in range(60) if i % 3} == {"targeting"}
    assert all(event["context"] == {"campaign": "spring"} for event in events)
    spans = exporter.get_finished_spans()
    assert len([s for s in spans if s.name.endswith("process")]) == len(bodies)
    assert {s.attributes.get("ab.reason") for s in spans if s.attributes and "ab.reason" in s.attributes} == {
        "bucketed",
        "targeting",
    }
    outputs = {
        "events": json.dumps(events),
        "rows": "\n".join(row.model_dump_json() for row in sink.rows),
        "spans": "\n".join(span.to_json() for span in spans),
        "logs": caplog.text,
    }
    assert "Dead-lettered UnknownExperiment" in outputs["logs"]
    for where, text in outputs.items():
        assert "example.com" not in text, f"an e-mail address reached the {where}"


# -- bad input ------------------------------------------------------------------------------------

TYPED = ExperimentRegistry.from_dict(
    {
        "experiments": [
            {
                "id": "typed",
                "split": {"control": 0.5, "blue": 0.5},
                "targeting": {
                    "app_version": {"$vgte": "5.2.0"},
                    "age": {"$gte": 18},
                    "signup_at": {"$lt": "2026-06-01T00:00:00Z"},
                    "country": {"$in": ["US", "CA"]},
                },
            }
        ]
    }
)
MATCHING = {"app_version": "5.10.1", "age": 30, "signup_at": "2026-01-01T00:00:00+01:00", "country": "US"}


def _deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


WRONG_KINDS: list[dict[str, Any]] = [
    {"app_version": 5.2},
    {"app_version": "5.2.0.1"},
    {"app_version": "v5.2.0"},
    {"app_version": ["5.2.0"]},
    {"age": "30"},
    {"age": True},
    {"age": 0.0},
    {"age": {"years": 30}},
    {"signup_at": "2026-01-01"},
    {"signup_at": "yesterday"},
    {"signup_at": 1767225600},
    {"country": ["US"]},
    {"country": 1},
    {"country": None},
    {"country": "us"},
]


def test_contexts_of_the_wrong_kind_or_at_the_limits_are_decided_and_over_them_dead_lettered(
    broker: LocalBroker, clients: list
) -> None:
    """Wrong kinds never match (no crash, no dead letter); contexts at the contract's limits are decided; a
    context that is not an object or breaks a limit is dead-lettered with the reason that names it."""
    good: list[tuple[str, dict[str, Any], str]] = [("match", MATCHING, "in")]
    good += [(f"wrong-{i}", MATCHING | wrong, "targeting") for i, wrong in enumerate(WRONG_KINDS)]
    at_limits = {f"k{i:02d}": i for i in range(58)} | MATCHING  # 64 keys in all, the limit
    at_limits["long"] = "é" * 1024
    at_limits["deep"] = _deep(4)
    good.append(("limits", at_limits, "in"))
    huge_numbers = MATCHING | {"age": int("9" * 400)}  # beyond a double: +infinity, and >= 18
    good.append(("huge-number", huge_numbers, "in"))
    bad: dict[str, tuple[bytes, str]] = {
        "not-object-text": (_body({"context": "email=a@b.c"}), "SchemaValidationFailed"),
        "not-object-list": (_body({"context": [1, 2]}), "SchemaValidationFailed"),
        "too-many-keys": (_body({"context": {f"k{i}": i for i in range(65)}}), "SchemaValidationFailed"),
        "too-long": (_body({"context": {"note": "x" * 1025}}), "SchemaValidationFailed"),
        "too-deep": (_body({"context": {"deep": _deep(5)}}), "SchemaValidationFailed"),
        "too-big": (_body({"context": {f"k{i}": "y" * 1024 for i in range(64)}}), "MessageTooLarge"),
        "number-too-long": (_body({}).replace(b"}", b', "context": {"age": ' + b"9" * 5000 + b"}}"), "InvalidJson"),
    }
    ids = [name for name, _, _ in good] + list(bad)
    bodies: list[bytes] = [_body({"user_id": f"T-{name}", "context": context}) for name, context, _ in good]
    bodies += [raw for raw, _ in bad.values()]
    _publish(broker, bodies, ids)
    stats = _pump(broker, clients, TYPED).run(until=settled(len(bodies)))
    assert stats.completed == len(good)
    assert sum(stats.dead_letters.values()) == len(bad)
    events = _events(broker, len(good))
    for name, _, expected in good:
        (raw,) = events[event_id_for(name)]
        event = json.loads(raw)
        if expected == "in":
            assert (event["reason"], event["in_experiment"]) == ("bucketed", True), name
        else:
            assert (event["reason"], event["in_experiment"], event["variant_id"]) == ("targeting", False, "control")
    letters = dead_letters(broker, len(bad))
    for name, (_, reason) in bad.items():
        assert letters[name][0] == reason, (name, letters[name])
    assert "context" in letters["not-object-list"][1]
    assert "65 keys" in letters["too-many-keys"][1]
    assert "1025-character" in letters["too-long"][1]
    assert "deeper than 4" in letters["too-deep"][1]


def _body(fields: dict[str, Any]) -> bytes:
    return json.dumps({"user_id": "T", "experiment_id": "typed"} | fields).encode()
