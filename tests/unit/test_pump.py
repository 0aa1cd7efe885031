"""The pump's settlement rules, on in-memory fakes."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from adapters.memory import MemoryPublisher, MemorySink, MemorySource
from schemas import SCHEMA_VERSION, AssignmentEvent
from tests.waiting import wait_for
from worker.bootstrap import bootstrap, stop_on_signals
from worker.domain.errors import PermanentError, TransientError
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import event_id_for
from worker.service.observe import OutageLimit
from worker.service.pump import Disposition, Pump, PumpConfig, settled, settlement_for

REGISTRY = ExperimentRegistry.from_dict(
    {
        "experiments": [
            {"id": "exp_001", "split": {"A": 0.5, "B": 0.5}, "version": "7", "variants": {"A": {"tone": "urgent"}}},
            {"id": "seg", "split": {"A": 0.5, "B": 0.5}, "segments": {"vip": {"A": 0.0, "B": 1.0}}},
        ]
    }
)


def _request(user="U123", experiment="exp_001", **extra):
    return json.dumps({"user_id": user, "experiment_id": experiment, **extra})


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _pump(source, publisher=None, sink=None, provider=None, **config):
    return bootstrap(
        source=source,
        publisher=publisher or MemoryPublisher(),
        sink=sink or MemorySink(),
        registry=lambda: REGISTRY,
        config=PumpConfig(**config),
        tracer_provider=provider,
    )


def test_success_publishes_records_then_completes():
    """A good request yields one event and one row, and is completed after both were accepted."""
    source, publisher, sink = MemorySource(), MemoryPublisher(), MemorySink()
    source.send(_request(), message_id="m1", correlation_id="corr-1")
    _pump(source, publisher, sink).run(idle_exit=0)
    assert [d.message_id for d in source.completed] == ["m1"]
    (event,) = publisher.published
    body = json.loads(event.body)
    assert body["variant_id"] == "A"
    assert body["hash_value"] == 0.002099
    assert body["experiment_version"] == "7"
    assert body["variant_metadata"] == {"tone": "urgent"}
    assert event.message_id == event_id_for("m1") == body["event_id"]
    assert event.correlation_id == "corr-1"
    assert event.application_properties == {
        "event_type": "assignment",
        "experiment_id": "exp_001",
        "variant_id": "A",
        "schema_version": SCHEMA_VERSION,
    }
    assert [r.EventId for r in sink.rows] == [body["event_id"]]


def test_completion_waits_for_the_row_flush():
    """Nothing is completed while its row is only buffered."""
    source, sink = MemorySource(), MemorySink(max_rows=10)
    for i in range(3):
        source.send(_request(f"U{i}"))
    pump = _pump(source, sink=sink)
    assert pump.run_once() == 3
    assert source.completed == []
    assert len(sink.buffer) == 3
    pump.drain()
    assert len(source.completed) == 3
    assert len(sink.rows) == 3


def test_redelivered_request_yields_identical_event():
    """The same message, delivered twice, produces byte-identical events."""
    source, publisher = MemorySource(), MemoryPublisher()
    delivery = source.send(_request(), message_id="m-dup")
    source.send(delivery.body, message_id="m-dup", enqueued_time=delivery.enqueued_time)
    _pump(source, publisher).run(idle_exit=0)
    first, second = publisher.published
    assert first.body == second.body
    assert first.message_id == second.message_id


@pytest.mark.parametrize(
    ("body", "reason", "fragment"),
    [
        (b"\xff\xfe not utf8", "InvalidJson", "not UTF-8"),
        (b"{not json", "InvalidJson", "not JSON"),
        (b"[1, 2]", "SchemaValidationFailed", "JSON object, got list"),
        (_request(user=7).encode(), "SchemaValidationFailed", "user_id: Input should be a valid string (got 7)"),
        (json.dumps({"experiment_id": "exp_001"}).encode(), "SchemaValidationFailed", "user_id: Field required"),
        (_request(user="x" * 2000).encode(), "SchemaValidationFailed", "at most 1024 characters"),
        (_request(experiment="nope").encode(), "UnknownExperiment", "experiment_id 'nope' is not configured"),
        (b"[" * 100_000 + b"]" * 100_000, "MessageTooLarge", "limit is 65536"),
        (b"[" * 30_000 + b"]" * 30_000, "InvalidJson", "nested too deeply"),
    ],
)
def test_poison_is_dead_lettered_with_precise_reason(body, reason, fragment):
    """Each kind of bad input is dead-lettered once, with its reason and a precise description."""
    source = MemorySource()
    source.send(body, message_id="bad")
    stats = _pump(source).run(idle_exit=0)
    (dead,) = source.dead_letters
    assert dead.reason == reason
    assert fragment in dead.description
    assert len(dead.description) <= 1024
    assert stats.dead_letters == {reason: 1}


def test_description_is_truncated_to_a_safe_length():
    """A huge bad value does not produce a huge description."""
    source = MemorySource()
    source.send(json.dumps({"user_id": "U", "experiment_id": "e" * 1000, "segment": "s" * 5000}).encode())
    _pump(source).run(idle_exit=0)
    assert len(source.dead_letters[0].description) <= 1024


def test_one_bad_message_does_not_affect_its_batch():
    """Bad messages are dead-lettered individually; the good ones in the same batch complete."""
    source, publisher = MemorySource(), MemoryPublisher()
    for i in range(10):
        source.send(b"garbage" if i % 3 == 0 else _request(f"U{i}").encode(), message_id=f"m{i}")
    stats = _pump(source, publisher, max_batch=10).run(idle_exit=0)
    assert stats.batches == 1
    assert sorted(d.delivery.message_id for d in source.dead_letters) == ["m0", "m3", "m6", "m9"]
    assert len(source.completed) == 6
    assert len(publisher.published) == 6


def test_publish_outage_holds_messages_and_retries_without_burning_deliveries():
    """A publish outage pauses the batch and retries with backoff: no abandon, no dead-letter, one delivery."""
    source, publisher, sink = MemorySource(), MemoryPublisher(failures_left=5), MemorySink()
    source.send(_request(), message_id="m1")
    stats = _pump(source, publisher, sink, min_backoff=0.001).run(idle_exit=0)
    assert source.dead_letters == []
    assert stats.abandoned == 0
    assert stats.downstream_retries == 5
    assert [(d.message_id, d.delivery_count) for d in source.completed] == [("m1", 1)]
    assert len(publisher.published) == 1
    assert len(sink.rows) == 1


def test_flush_outage_retries_with_the_same_rows():
    """A failed row flush is retried with the rows buffered again; every row lands exactly once."""
    source, publisher, sink = MemorySource(), MemoryPublisher(), MemorySink(failures_left=3)
    for i in range(3):
        source.send(_request(f"U{i}"), message_id=f"m{i}")
    stats = _pump(source, publisher, sink, min_backoff=0.001).run(idle_exit=0)
    assert stats.abandoned == 0
    assert stats.downstream_retries == 3
    assert len(source.completed) == 3
    assert sorted(r.UserId for r in sink.rows) == ["U0", "U1", "U2"]
    assert source.dead_letters == []


def test_outage_makes_the_pump_unready_until_it_recovers():
    """health() reports not ready, naming the dependency, while the topic is down; ready again after."""
    source, publisher = MemorySource(), MemoryPublisher()
    pump = _pump(source, publisher, min_backoff=0.001)
    observed = []

    def fail(events: object) -> bool:
        observed.append(pump.health())
        return len(observed) < 3

    publisher.fail = fail
    source.send(_request())
    pump.run(idle_exit=0)
    assert observed[1][1] is False
    assert "event topic down" in observed[1][2]
    live, ready, detail = pump.health()
    assert ready is False
    assert (live, detail) == (True, "draining")
    fresh = _pump(MemorySource())
    assert fresh.health() == (True, True, "ok")


def test_shutdown_during_outage_abandons_held_messages():
    """Stopping while the topic is down releases held messages for another replica instead of waiting."""
    source = MemorySource()
    pump = _pump(source, MemoryPublisher(fail=lambda events: (pump.stop(), True)[1]), min_backoff=0.001)
    source.send(_request(), message_id="m1")
    stats = pump.run()
    assert stats.abandoned == 1
    assert source.completed == []
    assert [d.message_id for d in source.queue] == ["m1"]


def test_receive_failure_backs_off_and_recovers():
    """A broker outage on receive is retried with backoff; processing resumes when it returns."""

    class FlakySource(MemorySource):
        failures = 3

        def receive(self, max_messages, max_wait):
            if self.failures:
                self.failures -= 1
                raise TransientError("broker unreachable")
            return super().receive(max_messages, max_wait)

    source = FlakySource()
    source.send(_request(), message_id="m1")
    stats = _pump(source, min_backoff=0.001).run(idle_exit=0)
    assert stats.receive_failures == 3
    assert [d.message_id for d in source.completed] == ["m1"]


class _DownSource(MemorySource):
    """A broker whose receives fail (``False`` in ``answers``) after ``attempt_seconds`` on the test's clock."""

    def __init__(self, clock: list[float], attempt_seconds: float, answers: list[bool] | None = None) -> None:
        super().__init__()
        self.clock, self.attempt_seconds, self.answers, self.attempts = clock, attempt_seconds, answers, 0

    def receive(self, max_messages, max_wait):
        self.attempts += 1
        if self.answers is not None and (not self.answers or self.answers.pop(0)):
            return super().receive(max_messages, max_wait)
        self.clock[0] += self.attempt_seconds
        raise TransientError("receive failed: Connection refused")


def _draining(source: _DownSource, limit_seconds: float) -> tuple[Pump, OutageLimit]:
    limit = OutageLimit(limit_seconds, lambda: pump.stop(), clock=lambda: source.clock[0])  # noqa: PLW0108
    pump = bootstrap(
        source=source,
        publisher=MemoryPublisher(),
        sink=MemorySink(),
        registry=lambda: REGISTRY,
        config=PumpConfig(min_backoff=0.001, max_backoff=0.001, max_batch=1),
        observers=[limit],
    )
    return pump, limit


def test_outage_limit_stops_a_drain_at_the_first_failure_past_the_limit():
    """A drain against a broker that stays down ends at the first failure past the limit, naming it and why."""
    source = _DownSource([0.0], attempt_seconds=7.0)
    pump, limit = _draining(source, 30.0)
    pump.run(idle_exit=3.0)
    assert limit.outage is not None
    assert (limit.outage.dependency, limit.outage.error) == ("broker", "receive failed: Connection refused")
    # Failures at 7, 14, 21, 28, 35, 42 s: the first one 30 s after the first failure is the one at 42 s.
    assert (source.attempts, limit.outage.seconds) == (6, 35.0)


def test_outage_limit_forgets_an_outage_that_ended():
    """Failures separated by successful receives do not add up: a drain that keeps reconnecting drains."""
    source = _DownSource([0.0], attempt_seconds=20.0, answers=[False, True, False, True, False, True])
    for user in ("U1", "U2", "U3"):
        source.send(_request(user), message_id=user)
    pump, limit = _draining(source, 30.0)
    stats = pump.run(idle_exit=0)
    assert limit.outage is None
    assert (stats.receive_failures, stats.completed) == (3, 3)


def test_lost_lock_is_counted_not_fatal():
    """A lock lost at settlement is logged and counted; the pump carries on and the message comes back."""
    source = MemorySource()
    source.send(_request(), message_id="m1")
    source.lost_locks.add("m1")
    stats = _pump(source).run(idle_exit=0)
    assert stats.settlement_lost == 1
    assert [d.message_id for d in source.completed] == ["m1"]


def test_unexpected_handler_error_abandons_until_max_delivery_count():
    """A bug in handling abandons the message; the broker's max delivery count bounds the retries."""

    class BrokenRegistry:
        source = "broken"

        def get(self, experiment_id):
            raise RuntimeError("bug")

        def __len__(self):
            return 0

    source = MemorySource(max_delivery_count=3)
    source.send(_request(), message_id="m1")
    source.send(_request("U2"), message_id="m2")
    stats = bootstrap(
        source=source,
        publisher=MemoryPublisher(),
        sink=MemorySink(),
        registry=BrokenRegistry,  # type: ignore[arg-type]  # a registry that breaks when asked, on purpose
        config=PumpConfig(),
    ).run(idle_exit=0)
    assert stats.abandoned == 6
    assert source.completed == []
    assert [d.reason for d in source.dead_letters] == ["MaxDeliveryCountExceeded"] * 2


def test_segment_override_and_context_allow_list():
    """A segment's split is applied; only allow-listed context keys leave the worker."""
    source, publisher, sink = MemorySource(), MemoryPublisher(), MemorySink()
    context = {"segment": "vip", "email": "person@example.com", "campaign": "c1"}
    source.send(_request(experiment="seg", context=context))
    _pump(source, publisher, sink, context_allow_list={"campaign"}).run(idle_exit=0)
    body = json.loads(publisher.published[0].body)
    assert body["variant_id"] == "B"
    assert body["segment"] == "vip"
    assert body["split_ratio"] == {"A": 0.0, "B": 1.0}
    assert body["context"] == {"campaign": "c1"}
    assert "person@example.com" not in publisher.published[0].body.decode()
    assert sink.rows[0].Context == {"campaign": "c1"}


def test_context_is_dropped_by_default():
    """With no allow-list, no context reaches the event or the row."""
    source, publisher, sink = MemorySource(), MemoryPublisher(), MemorySink()
    source.send(_request(context={"email": "person@example.com"}))
    _pump(source, publisher, sink).run(idle_exit=0)
    assert json.loads(publisher.published[0].body)["context"] == {}
    assert sink.rows[0].Context == {}


def test_spans_continue_publisher_trace_and_carry_attributes(spans):
    """One CONSUMER span per message, child of the publisher's traceparent, with messaging and flag attributes."""
    provider, exporter = spans
    source = MemorySource()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    source.send(
        _request(), message_id="m1", application_properties={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    source.send(b"junk", message_id="m2")
    _pump(source, provider=provider).run(idle_exit=0)
    process = {
        s.attributes["messaging.message.id"]: s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER
    }
    good, bad = process["m1"], process["m2"]
    assert good.name == "assignment-requests process"
    assert format(good.context.trace_id, "032x") == trace_id
    assert good.attributes["messaging.system"] == "servicebus"
    assert good.attributes["feature_flag.key"] == "exp_001"
    assert good.attributes["feature_flag.result.variant"] == "A"
    assert good.attributes["messaging.servicebus.disposition_status"] == "complete"
    assert bad.attributes["messaging.servicebus.disposition_status"] == "dead_letter"
    assert bad.attributes["messaging.servicebus.dead_letter_reason"] == "InvalidJson"
    producers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert [s.name for s in producers] == ["assignment-events publish"]


def test_diagnostic_id_is_accepted_as_parent(spans):
    """The older Diagnostic-Id property also continues the trace."""
    provider, exporter = spans
    source = MemorySource()
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    source.send(_request(), application_properties={"Diagnostic-Id": f"00-{trace_id}-b7ad6b7169203331-01"})
    _pump(source, provider=provider).run(idle_exit=0)
    (span,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert format(span.context.trace_id, "032x") == trace_id


def test_settlement_policy_is_one_pure_function():
    """Outcome → settlement: event → complete; permanent → dead-letter with reason; other → abandon."""
    from worker.domain.errors import DeadLetterReason

    dead = settlement_for(PermanentError(DeadLetterReason.UNKNOWN_EXPERIMENT, "x"))
    assert (dead.disposition, dead.reason, dead.description) == (Disposition.DEAD_LETTER, "UnknownExperiment", "x")
    assert settlement_for(TransientError("down")).disposition is Disposition.ABANDON
    assert settlement_for(ValueError()).disposition is Disposition.ABANDON
    event = AssignmentEvent.model_validate_json(
        '{"event_id":"e","correlation_id":"c","variant_id":"A","hash_value":0.1,"threshold":[0,0.5],'
        '"in_experiment":true,"reason":"bucketed","config_version":"0123456789abcdef","experiment_id":"x","experiment_version":"1","user_id":"u","strategy":"md5_hash","deterministic":true,'
        '"seed":"s","split_ratio":{"A":1.0},"assigned_at":"2026-01-01T00:00:00Z"}'
    )
    assert settlement_for(event).disposition is Disposition.COMPLETE


class _EndlessSource(MemorySource):
    """Always has more work, so only a stop request ends the pump."""

    def receive(self, max_messages, max_wait):
        for _ in range(max_messages):
            self.send(_request(f"U{len(self.completed)}"))
        time.sleep(0.01)
        return super().receive(max_messages, max_wait)


def test_sigterm_finishes_in_flight_batch_and_exits_cleanly():
    """SIGTERM: stop receiving, settle the in-flight batch, flush rows, close every port."""
    source, publisher, sink = _EndlessSource(), MemoryPublisher(), MemorySink()
    pump = _pump(source, publisher, sink, max_batch=20)
    exited: list[int] = []
    with stop_on_signals(pump, deadline=30, exit_now=exited.append):
        thread = threading.Thread(target=pump.run)
        thread.start()
        wait_for(lambda: pump.stats.received > 0, what="the first batch")
        signal.raise_signal(signal.SIGTERM)
        thread.join(timeout=30)  # a hang guard: the in-flight batch takes milliseconds
    assert exited == []
    assert not thread.is_alive()
    received = pump.stats.received
    assert received > 0
    assert len(source.completed) == received, "every received message was settled"
    assert len(sink.rows) == received
    assert source.closed
    assert publisher.closed
    assert sink.closed


def _cohort(members, **extra):
    return json.dumps(
        {
            "kind": "cohort",
            "experiment_id": "email-tone",
            "arms": [{"id": "control"}, {"id": "treatment", "variants_by_segment": {"vip": "urgent"}}],
            "members": [{"member_id": m, "segment": s} for m, s in members],
            **extra,
        }
    )


def test_cohort_message_yields_member_events_report_and_rows():
    """A cohort request produces one event and row per member plus one cohort report, then completes."""
    members = [(f"C{i:03d}", "vip" if i % 3 == 0 else "standard") for i in range(60)]
    source, publisher, sink = MemorySource(), MemoryPublisher(), MemorySink()
    source.send(_cohort(members, request_id="cohort-7"), message_id="c1")
    stats = _pump(source, publisher, sink).run(idle_exit=0)
    assert stats.completed == 1
    assignments = [
        json.loads(m.body) for m in publisher.published if m.application_properties["event_type"] == "assignment"
    ]
    (report,) = [
        json.loads(m.body) for m in publisher.published if m.application_properties["event_type"] == "cohort_report"
    ]
    assert sorted(a["user_id"] for a in assignments) == sorted(m for m, _ in members)
    assert {a["strategy"] for a in assignments} == {"stratified_random"}
    assert {a["cohort_id"] for a in assignments} == {"cohort-7"}
    vip_treated = [a for a in assignments if a["segment"] == "vip" and a["experiment_arm"] == "treatment"]
    assert vip_treated
    assert {a["variant_id"] for a in vip_treated} == {"urgent"}
    assert report["member_count"] == 60
    assert report["passed"] is True
    assert len(sink.rows) == 60
    assert {r.CohortId for r in sink.rows} == {"cohort-7"}


def test_cohort_replay_yields_identical_events():
    """The same cohort message delivered twice produces byte-identical events."""
    members = [(f"C{i}", "s") for i in range(20)]
    source, publisher = MemorySource(), MemoryPublisher()
    first = source.send(_cohort(members, min_per_cell=1), message_id="c1")
    source.send(first.body, message_id="c1", enqueued_time=first.enqueued_time)
    _pump(source, publisher).run(idle_exit=0)
    bodies = [m.body for m in publisher.published]
    half = len(bodies) // 2
    assert bodies[:half] == bodies[half:]


@pytest.mark.parametrize(
    ("body", "reason", "fragment"),
    [
        (_cohort([(f"C{i}", "s") for i in range(30)]), "CohortTooLarge", "limit is 25"),
        (_cohort([("C1", "s"), ("C1", "s")]), "InvalidCohort", "C1"),
        (
            json.dumps({"kind": "cohort", "experiment_id": "e", "arms": [], "members": []}),
            "SchemaValidationFailed",
            "arms",
        ),
    ],
)
def test_bad_cohorts_are_dead_lettered(body, reason, fragment):
    """Oversized, duplicate-member and malformed cohorts are dead-lettered with a reason saying so."""
    source = MemorySource()
    source.send(body)
    _pump(source, max_cohort_members=25).run(idle_exit=0)
    (dead,) = source.dead_letters
    assert dead.reason == reason
    assert fragment in dead.description


def _rejection(message_id: str) -> dict[str, PermanentError]:
    from worker.domain.errors import DeadLetterReason

    return {
        event_id_for(message_id): PermanentError(
            DeadLetterReason.REPLY_UNDELIVERABLE, "reply entity 'gone' does not exist"
        )
    }


def test_rejected_event_dead_letters_its_request_alone_and_nothing_is_republished():
    """PublishRejected: the refused request is dead-lettered with the reason; the rest is recorded and completed."""
    source, sink = MemorySource(), MemorySink()
    publisher = MemoryPublisher(reject=_rejection("m2"))
    for i in range(4):
        source.send(_request(f"U{i}"), message_id=f"m{i}")
    stats = _pump(source, publisher, sink, max_batch=10).run(idle_exit=0)
    (dead,) = source.dead_letters
    assert (dead.delivery.message_id, dead.reason) == ("m2", "ReplyUndeliverable")
    assert "'gone' does not exist" in dead.description
    assert sorted(d.message_id for d in source.completed) == ["m0", "m1", "m3"]
    assert publisher.calls == 1, "accepted events must not be published again"
    assert sorted(e.message_id for e in publisher.published) == sorted(event_id_for(f"m{i}") for i in (0, 1, 3))
    assert sorted(r.UserId for r in sink.rows) == ["U0", "U1", "U3"]
    assert stats.dead_letters == {"ReplyUndeliverable": 1}
    assert stats.abandoned == 0


def test_rejection_after_a_transient_failure_still_publishes_each_event_once():
    """A transient failure retries the whole batch; the rejecting attempt then ends it: no event twice."""
    source = MemorySource()
    publisher = MemoryPublisher(failures_left=2, reject=_rejection("m0"))
    for i in range(3):
        source.send(_request(f"U{i}"), message_id=f"m{i}")
    stats = _pump(source, publisher, min_backoff=0.001, max_batch=10).run(idle_exit=0)
    assert publisher.calls == 3
    assert len(publisher.published) == len({e.message_id for e in publisher.published}) == 2
    assert [d.delivery.message_id for d in source.dead_letters] == ["m0"]
    assert stats.completed == 2
    assert stats.downstream_retries == 2


def test_every_outcome_goes_through_settlement_for():
    """Lock lost → nothing to do; stopping → abandon (released for another replica)."""
    from worker.service.ports import SettlementLostError
    from worker.service.pump import Stopping

    assert settlement_for(SettlementLostError("gone")).disposition is Disposition.LOCK_LOST
    stopping = settlement_for(Stopping())
    assert stopping.disposition is Disposition.ABANDON
    assert "another replica" in stopping.description


def test_liveness_stays_fresh_while_backing_off_on_purpose():
    """An outage far longer than liveness_timeout: /healthz stays live, /readyz is not ready, nothing burned.

    The outage ends when the test has seen it outlast the liveness timeout three times over (and the
    pump retry, and the probes sample it), not after a fixed 1.2 s; the liveness timeout is 1 s, so
    the heartbeat (every 0.25 s while backing off) has a second of slack on a busy machine.
    """
    source, publisher = MemorySource(), MemoryPublisher()
    liveness = 1.0
    pump = _pump(source, publisher, min_backoff=0.05, max_backoff=0.1, liveness_timeout=liveness)
    recovered = threading.Event()
    publisher.fail = lambda events: not recovered.is_set()
    source.send(_request(), message_id="m1")
    probes: list[tuple[bool, bool, str]] = []
    done = threading.Event()

    def probe():
        while not done.is_set():
            probes.append(pump.health())
            done.wait(0.02)

    def during():
        return [p for p in probes if "event topic down" in p[2]]

    prober = threading.Thread(target=probe)
    runner = threading.Thread(target=pump.run, kwargs={"until": settled(1)})
    prober.start()
    runner.start()
    try:
        wait_for(lambda: pump.stats.downstream_retries > 0, what="the outage to start")
        began = time.monotonic()
        wait_for(
            lambda: (
                time.monotonic() - began > 3 * liveness and pump.stats.downstream_retries > 5 and len(during()) > 20
            ),
            what="an outage three times the liveness timeout, retried and probed",
        )
        recovered.set()
        runner.join(30)
        assert not runner.is_alive()
    finally:
        recovered.set()
        done.set()
        prober.join()
    assert all(live and not ready for live, ready, _ in during()), [p for p in during() if not p[0]][:3]
    assert [(d.message_id, d.delivery_count) for d in source.completed] == [("m1", 1)]


def test_run_until_settled_returns_without_waiting_for_idle():
    """run(until=settled(n)) stops as soon as n messages are settled, even on a source that never empties."""
    source = _EndlessSource()
    started = time.monotonic()
    stats = _pump(source, max_batch=10).run(until=settled(25))
    assert stats.settled >= 25
    # A hang guard (an endless source never goes idle: without ``until`` the run never returns).
    assert time.monotonic() - started < 30
    assert len(source.completed) == stats.completed


def test_sigterm_exits_by_the_drain_deadline_when_a_call_never_returns():
    """stop_on_signals: a publish that hangs cannot keep the process past the drain deadline."""
    hung, released, exited = threading.Event(), threading.Event(), list[int]()

    class HangingPublisher(MemoryPublisher):
        def publish(self, events):
            hung.set()
            released.wait(30)

    source = MemorySource()
    source.send(_request(), message_id="m1")
    pump = _pump(source, HangingPublisher())
    previous = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=pump.run, daemon=True)
    try:
        with stop_on_signals(pump, deadline=0.3, exit_now=exited.append):
            thread.start()
            assert hung.wait(30)
            sent = time.monotonic()
            signal.raise_signal(signal.SIGTERM)
            # Only the deadline's timer can end this: the publish never returns while the test waits.
            wait_for(lambda: exited, what="the drain deadline to end the process")
            took = time.monotonic() - sent
    finally:
        released.set()
        thread.join(10)
    assert exited == [1]
    # Not at once: the timer starts with the signal, after ``sent``, and waits its 0.3 s (a lower bound
    # a busy machine cannot break: it only makes the timer later).
    assert took >= 0.3
    assert signal.getsignal(signal.SIGTERM) is previous, "the previous handler is restored"


def test_observers_see_each_step():
    """The observer seam: received → handled → settled, backoff and recovery, in order."""
    from worker.service.observe import PumpObserver

    class Recorder(PumpObserver):
        def __init__(self):
            self.calls = []

        def on_received(self, deliveries):
            self.calls.append(("received", len(deliveries)))

        def on_handled(self, delivery, outcome):
            self.calls.append(("handled", delivery.message_id))

        def on_settled(self, delivery, settlement, handled):
            self.calls.append(("settled", delivery.message_id, settlement.disposition.value))

        def on_backoff(self, dependency, error, attempt):
            self.calls.append(("backoff", dependency, attempt))

        def on_recovered(self, dependency):
            self.calls.append(("recovered", dependency))

    recorder = Recorder()
    source = MemorySource()
    source.send(_request(), message_id="m1")
    bootstrap(
        source=source,
        publisher=MemoryPublisher(failures_left=1),
        sink=MemorySink(),
        registry=lambda: REGISTRY,
        config=PumpConfig(min_backoff=0.001),
        observers=[recorder],
    ).run(until=settled(1))
    assert recorder.calls == [
        ("received", 1),
        ("handled", "m1"),
        ("backoff", "event topic", 0),
        ("recovered", "event topic"),
        ("settled", "m1", "complete"),
    ]


def test_each_dead_letter_is_logged_at_info_with_reason_message_and_experiment(caplog):
    """One INFO line per dead-lettered request names its reason, message id and experiment."""
    source = MemorySource()
    source.send(_request(experiment="exp_missing"), message_id="m-unknown")
    source.send(b"{not json", message_id="m-garbage")
    source.send(_request(), message_id="m-good")
    caplog.set_level(logging.INFO, logger="worker.service")
    _pump(source).run(until=settled(3))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dead-lettered")]
    assert lines == [
        "Dead-lettered UnknownExperiment: message m-unknown, experiment 'exp_missing'",
        "Dead-lettered InvalidJson: message m-garbage, experiment -",
    ]


def test_dead_letter_lines_are_rate_limited_and_count_what_they_left_out(caplog):
    """A flood of poison logs a burst, then a line that says how many were left out; nothing is lost."""
    from worker.service.observe import Logging, Settlement
    from worker.service.ports import Delivery

    now = [0.0]
    observer = Logging(per_second=1.0, burst=3, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="worker.service")
    poison = Settlement(Disposition.DEAD_LETTER, "InvalidJson", "bad")
    for number in range(10):
        observer.on_settled(Delivery(body=b"x", message_id=f"m{number}"), poison, None)
    now[0] = 1.0
    observer.on_settled(Delivery(body=b"x", message_id="m10"), poison, None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dead-lettered")]
    assert len(lines) == 4
    assert lines[-1].endswith("message m10, experiment - (7 more dead-lettered since the last such line, not logged)")


def test_a_receive_waits_no_longer_than_the_held_rows_take_to_fall_due():
    """Settlement is not kept waiting by a receive: its wait is cut to when the held rows are due by age.

    A trickle keeps every receive busy, so the rows are flushed by age, and no receive may wait past it.
    """
    from adapters.files import JsonLinesSink

    now = [100.0]

    class Trickle(MemorySource):
        waits: list[float]

        def receive(self, max_messages, max_wait):
            self.waits.append(max_wait)
            now[0] += 0.5  # one request arrives every half second of the pump's clock
            self.send(_request(user=f"U{len(self.waits)}"))
            return super().receive(max_messages, max_wait)

    source = Trickle()
    source.waits = []
    sink = JsonLinesSink(None, max_rows=1000, max_age=2.0, clock=lambda: now[0])
    pump = _pump(source, sink=sink, max_wait=30.0)
    for _ in range(5):
        pump.run_once()
    # Nothing held before the first receive: the configured wait. The first row is held from 100.5 and
    # due at 102.5: each later wait is what is left of its age, never the 30 s.
    assert source.waits == [30.0, pytest.approx(2.0), pytest.approx(1.5), pytest.approx(1.0), pytest.approx(0.5)]
    # Flushed at 102.5 and settled while request 5 was publishing: its row waits for the next flush.
    assert len(source.completed) == 4
    assert sink.rows_written == 4
    pump.drain()


def test_an_event_that_cannot_be_serialised_fails_its_message_alone(monkeypatch):
    """Serialising is part of handling one message: a failure there abandons that message, not the batch.

    Before, the batch's events were serialised together after handling; one that raised (a lone
    surrogate in an allow-listed context did) stopped the pump, crash-looping the worker and, after
    ten restarts, dead-lettering its healthy batch-mates as MaxDeliveryCountExceeded.
    """
    from worker.service.handling import Handled

    serialise = Handled.outbound

    def fragile(self, delivery):
        if delivery.message_id == "bad":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return serialise(self, delivery)

    monkeypatch.setattr(Handled, "outbound", fragile)
    source, publisher = MemorySource(), MemoryPublisher()
    for i in range(3):
        source.send(_request(user=f"U{i}"), message_id=f"ok-{i}")
    source.send(_request(user="U9"), message_id="bad")
    pump = _pump(source, publisher=publisher)
    pump.run(idle_exit=0.2)  # returns: the pump did not stop on the error
    assert sorted(d.message_id for d in source.completed) == ["ok-0", "ok-1", "ok-2"]
    assert len(publisher.published) == 3
    # Abandoned each time (an unexpected error, not bad input) until the broker's max delivery count.
    assert {d.message_id for d in source.abandoned} == {"bad"}
    assert [(d.delivery.message_id, d.reason) for d in source.dead_letters] == [("bad", "MaxDeliveryCountExceeded")]
