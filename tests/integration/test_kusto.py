"""KustoSink through the real azure-kusto-ingest SDK: streaming to the Kusto stand-in, queued through
Azurite and the stand-in, and the pump end to end, including an outage and its recovery."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from adapters.kusto.sink import MAPPING_NAME, KustoSink, RetryPolicy, connection_builder, kusto_sink
from adapters.local.standins.kusto import KustoStandIn
from adapters.memory import MemoryPublisher, MemorySource
from schemas.models import AssignmentRecord
from tests.kusto_artifacts import ALLOCATION_COLUMNS, expected_columns
from tests.synthetic_rows import START, without_allocation
from tests.synthetic_rows import record as synthetic_row
from tests.waiting import wait_for
from worker.bootstrap import bootstrap
from worker.domain.errors import TransientError
from worker.domain.registry import ExperimentRegistry
from worker.domain.srm.tally import BEFORE_ALLOCATION, tally_rows
from worker.service.handling import event_id_for
from worker.service.observe import PumpObserver
from worker.service.ports import Delivery
from worker.service.pump import Pump, PumpConfig

pytestmark = pytest.mark.integration

DATABASE = "experiments"
TABLE = "AssignmentEvents"
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_tone", "split": {"A": 0.5, "B": 0.5}}]})
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2, attempt_timeout=2.0)
#: A deadline that only ends a hang (a flush that never returns), never a race with a slow machine.
HANG_GUARD = 60.0


def record(i: int) -> AssignmentRecord:
    """A row with every column filled, dynamic columns included."""
    return AssignmentRecord(
        EventId=f"event-{i}",
        AssignedAt=datetime(2026, 1, 1, 12, 0, i % 60, tzinfo=UTC),
        ExperimentId="exp_tone",
        ExperimentVersion="3",
        UserId=f"U{i}",
        VariantId="A" if i % 2 else "B",
        HashValue=0.123456,
        Segment="high_intent",
        Strategy="md5_hash",
        Seed="echovoice",
        SplitRatio={"A": 0.5, "B": 0.5},
        VariantMetadata={"tone": "friendly"},
        Context={"country": "NL"},
        RequestId=f"req-{i}",
        CorrelationId=f"corr-{i}",
        SchemaVersion="1.0",
        ExperimentArm="",
        CohortId="",
        InExperiment=True,
        Reason="bucketed",
        ConfigVersion="5e1f0c2d9a8b7c6d",
    )


def as_ingested(row: AssignmentRecord) -> dict[str, Any]:
    """What the deployed mapping makes of ``row``: its JSON, with null in every mapped column it lacks."""
    return {name: None for name, _ in expected_columns()} | row.model_dump(mode="json")


@pytest.fixture
def streaming_sink(kusto: KustoStandIn) -> Iterator[KustoSink]:
    """A streaming KustoSink pointed at the stand-in, with quick retries."""
    sink = kusto_sink(kusto.cluster_uri, DATABASE, TABLE, mode="streaming", retry=FAST_RETRY)
    yield sink
    sink.close()


def send_requests(source: MemorySource, count: int) -> list[Delivery]:
    """Enqueue ``count`` valid requests."""
    return [
        source.send(json.dumps({"user_id": f"U{i}", "experiment_id": "exp_tone"}), message_id=f"msg-{i}")
        for i in range(count)
    ]


def pump_for(source: MemorySource, sink: KustoSink, **config: Any) -> Pump:
    """The real pump over in-memory source and publisher, recording into ``sink``."""
    settings: dict[str, Any] = {"max_batch": 50, "min_backoff": 0.05, "max_backoff": 0.2, **config}
    return bootstrap(
        source=source, publisher=MemoryPublisher(), sink=sink, registry=lambda: REGISTRY, config=PumpConfig(**settings)
    )


# -- the sink on its own -------------------------------------------------------------------


def test_streaming_flush_ingests_every_column_through_the_mapping(
    kusto: KustoStandIn, streaming_sink: KustoSink
) -> None:
    """A flush posts gzipped JSON lines with the named mapping; the mapped rows equal the records."""
    records = [record(i) for i in range(25)]
    streaming_sink.add(records)

    streaming_sink.flush()

    assert kusto.rows(TABLE) == [as_ingested(r) for r in records]
    (ingestion,) = kusto.ingestions
    assert (ingestion.path, ingestion.database, ingestion.table, ingestion.mapping) == (
        "streaming",
        DATABASE,
        TABLE,
        MAPPING_NAME,
    )
    (request,) = kusto.requests
    assert request.headers["content-encoding"] == "gzip"
    assert "streamFormat=multijson" in request.path
    assert streaming_sink.buffered == 0


def test_rows_from_before_allocation_still_ingest_and_count_as_in_the_experiment(kusto: KustoStandIn) -> None:
    """Through the deployed mapping, a row file written before allocation (no InExperiment, Reason,
    ConfigVersion) still ingests with the real SDK, with nulls in those columns (a missing JSON path is
    null), and the report reads such a row as in the experiment; a new row keeps its reason."""
    from azure.kusto.data.data_format import DataFormat
    from azure.kusto.ingest import IngestionProperties, KustoStreamingIngestClient, StreamDescriptor

    split = {"A": 0.5, "B": 0.5}
    old = without_allocation(synthetic_row("exp", "A", split, START, user="u-old"))
    new = synthetic_row("exp", "B", split, START, user="u-new", reason="override")
    payload = "".join(json.dumps(row) + "\n" for row in (old, new)).encode()
    properties = IngestionProperties(
        database=DATABASE, table=TABLE, data_format=DataFormat.MULTIJSON, ingestion_mapping_reference=MAPPING_NAME
    )
    client = KustoStreamingIngestClient(connection_builder(kusto.cluster_uri))
    try:
        client.ingest_from_stream(StreamDescriptor(io.BytesIO(payload), size=len(payload)), properties)
    finally:
        client.close()

    ingested_old, ingested_new = kusto.rows(TABLE)
    assert [ingested_old[name] for name, _ in ALLOCATION_COLUMNS] == [None, None, None]
    assert [ingested_new[name] for name, _ in ALLOCATION_COLUMNS] == [False, "override", "cfg-1"]
    tally = tally_rows([ingested_old, ingested_new])
    assert tally.counted == 1
    assert dict(tally.reasons) == {("exp", True, BEFORE_ALLOCATION): {"A": 1}, ("exp", False, "override"): {"B": 1}}


def test_due_by_size_and_by_age(kusto: KustoStandIn) -> None:
    """due() turns true at max_rows rows, or once the oldest buffered row is max_age old."""
    # By size: an age no test run reaches, so nothing but the row count can make it due.
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", max_rows=3, max_age=600)
    try:
        assert not sink.due()
        sink.add([record(1), record(2)])
        assert not sink.due()
        sink.add([record(3)])
        assert sink.due()
        sink.flush()
        assert not sink.due()
        assert len(kusto.rows()) == 3
    finally:
        sink.close()
    # By age: one row, far below max_rows, falls due by itself.
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", max_rows=1000, max_age=0.2)
    try:
        sink.add([record(4)])
        wait_for(sink.due, what="the oldest row to be max_age old")
        sink.flush()
        assert not sink.due()
        assert len(kusto.rows()) == 4
    finally:
        sink.close()


def test_outage_raises_transient_error_after_bounded_retries_and_drops_the_buffer(
    kusto: KustoStandIn, streaming_sink: KustoSink
) -> None:
    """5xx on every attempt: flush retries 3 times, raises TransientError, empties the buffer.

    (How long it backs off between attempts is the unit tests' business, on a recorded sleep.)
    """
    kusto.fail_with(503)
    streaming_sink.add([record(i) for i in range(5)])

    with pytest.raises(TransientError, match=r"5 rows into experiments\.AssignmentEvents failed after 3 attempts"):
        streaming_sink.flush()

    assert len(kusto.requests) == 3
    assert streaming_sink.buffered == 0
    assert kusto.rows() == []


def test_unreachable_and_hung_endpoints_are_transient(kusto: KustoStandIn) -> None:
    """Connection refused, or no answer within attempt_timeout, is a TransientError; nothing hangs."""
    retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01, attempt_timeout=0.5)
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", retry=retry)
    try:
        kusto.down()
        sink.add([record(1)])
        with pytest.raises(TransientError, match="KustoNetworkError"):
            sink.flush()

        kusto.recover()
        # Requests are read and never answered: only the sink's attempt_timeout ends the flush. The
        # timer is a guard against a hang, not a race: without the timeout the flush waits for it.
        kusto.hang()
        sink.add([record(2)])
        guard = threading.Timer(HANG_GUARD, kusto.recover)
        guard.start()
        try:
            # The transport's own read timeout (capped at attempt_timeout) fires; the thread deadline backs it up.
            with pytest.raises(TransientError, match=r"read timeout=0\.5|no answer within 0\.5 s"):
                sink.flush()
        finally:
            guard.cancel()
        kusto.recover()
    finally:
        sink.close()
    # The abandoned attempts still land once the endpoint answers: duplicates are possible, never losses.
    wait_for(kusto.rows, what="the held attempt's row to land after recover()")


def test_unknown_mapping_is_refused_with_the_services_message(kusto: KustoStandIn) -> None:
    """A missing mapping is reported with Kusto's own words (and retried: the buffer is redelivered)."""
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", mapping_name="NoSuchMapping", retry=FAST_RETRY)
    try:
        sink.add([record(1)])
        with pytest.raises(TransientError, match="Mapping reference 'NoSuchMapping'"):
            sink.flush()
    finally:
        sink.close()


def test_errors_never_carry_secrets(kusto: KustoStandIn) -> None:
    """A SAS signature in an SDK error is redacted before it reaches our exception."""
    from adapters.kusto.sink import _describe

    text = _describe(RuntimeError("upload to http://x/c/b?sv=2024&sig=SECRETSIG&se=2026 failed"))
    assert "SECRETSIG" not in text
    assert "sig=***" in text


def test_queued_ingestion_through_azurite(kusto_queued: KustoStandIn) -> None:
    """Queued mode: resources from .get ingestion resources, blob upload and queue message in Azurite."""
    sink = kusto_sink(kusto_queued.cluster_uri, DATABASE, TABLE, mode="queued", retry=FAST_RETRY)
    records = [record(i) for i in range(40)]
    try:
        sink.add(records[:20])
        sink.flush()
        sink.add(records[20:])
        sink.flush()
    finally:
        sink.close()

    wait_for(lambda: len(kusto_queued.rows()) >= 40, what="40 queued rows", detail=lambda: kusto_queued.errors)
    assert sorted(kusto_queued.rows(), key=lambda r: str(r["EventId"])) == sorted(
        (as_ingested(r) for r in records), key=lambda r: r["EventId"]
    )
    assert {i.path for i in kusto_queued.ingestions} == {"queued"}
    assert {i.mapping for i in kusto_queued.ingestions} == {MAPPING_NAME}
    # Resources and the identity token are fetched once and cached by the SDK.
    assert kusto_queued.commands == [".get ingestion resources", ".get kusto identity token"]
    assert kusto_queued.errors == []


def test_queued_ingestion_outage_of_the_management_endpoint(kusto_queued: KustoStandIn) -> None:
    """No ingestion resources (management endpoint failing): TransientError, then success on recovery."""
    sink = kusto_sink(kusto_queued.cluster_uri, DATABASE, TABLE, mode="queued", retry=FAST_RETRY)
    try:
        kusto_queued.fail_with(500)
        sink.add([record(1)])
        with pytest.raises(TransientError):
            sink.flush()
        kusto_queued.recover()
        sink.add([record(1)])
        sink.flush()
    finally:
        sink.close()
    wait_for(kusto_queued.rows, what="the row queued after recovery", detail=lambda: kusto_queued.errors)


# -- the pump end to end -------------------------------------------------------------------


class RowCheckingSource(MemorySource):
    """A source that refuses to complete a message whose row the stand-in does not hold yet."""

    def __init__(self, kusto: KustoStandIn) -> None:
        super().__init__()
        self.kusto = kusto
        self.completed_before_row: list[str] = []

    def complete(self, delivery: Delivery) -> None:
        """Record a violation when the row is not in Kusto at completion time, then complete."""
        if event_id_for(delivery.message_id) not in {row["EventId"] for row in self.kusto.rows()}:
            self.completed_before_row.append(delivery.message_id)
        super().complete(delivery)


def test_pump_completes_messages_only_after_their_rows_are_ingested(kusto: KustoStandIn) -> None:
    """Pump + streaming KustoSink: every row arrives, and no message is completed before its row."""
    source = RowCheckingSource(kusto)
    send_requests(source, 120)
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", max_rows=50, retry=FAST_RETRY)

    stats = pump_for(source, sink).run(idle_exit=0)

    assert stats.completed == 120
    assert source.completed_before_row == []
    assert {row["EventId"] for row in kusto.rows()} == {event_id_for(f"msg-{i}") for i in range(120)}
    assert len(kusto.rows()) == 120


def test_pump_with_queued_ingestion(kusto_queued: KustoStandIn) -> None:
    """Pump + queued KustoSink through Azurite: every message completes and every row arrives."""
    source = MemorySource()
    send_requests(source, 60)
    sink = kusto_sink(kusto_queued.cluster_uri, DATABASE, mode="queued", max_rows=25, retry=FAST_RETRY)

    stats = pump_for(source, sink, max_batch=25).run(idle_exit=0)

    assert stats.completed == 60
    wait_for(lambda: len(kusto_queued.rows()) >= 60, what="60 queued rows", detail=lambda: kusto_queued.errors)
    assert {row["EventId"] for row in kusto_queued.rows()} == {event_id_for(f"msg-{i}") for i in range(60)}


def test_pump_outage_holds_then_abandons_and_every_row_arrives_after_recovery(kusto: KustoStandIn) -> None:
    """Kusto failing: flushes raise TransientError and the pump holds the batch, reporting not ready;
    stopped mid-outage it abandons (messages are redelivered); after recover() every row arrives."""
    source = MemorySource()
    send_requests(source, 80)
    kusto.fail_with(503)
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", retry=FAST_RETRY)
    pump = pump_for(source, sink)
    runner = threading.Thread(target=pump.run, name="pump-under-outage", daemon=True)
    runner.start()
    try:
        wait_for(lambda: pump.stats.downstream_retries >= 2, what="two failed flushes")
        live, ready, detail = pump.health()
        assert live
        assert not ready
        assert "record sink" in detail
        assert source.completed == []
    finally:
        pump.stop()
        runner.join(timeout=60)  # a hang guard: the stop lands after the batch in flight
    assert not runner.is_alive()
    assert pump.stats.completed == 0
    assert pump.stats.abandoned == 80
    assert len(source.queue) == 80  # redelivered
    assert source.dead_letters == []
    assert kusto.rows() == []

    kusto.recover()
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", retry=FAST_RETRY)
    stats = pump_for(source, sink).run(idle_exit=0)

    assert stats.completed == 80
    expected = {event_id_for(f"msg-{i}") for i in range(80)}
    assert {row["EventId"] for row in kusto.rows()} == expected  # none lost (duplicates would be allowed)


class RecoversAfterTheFirstFailedFlush(PumpObserver):
    """Ends a Kusto outage the moment the pump backs off from its first failed flush.

    The outage is driven from the test's side: it lasts exactly one failed flush, however fast or
    slow the machine is (a timer raced the pump's first flush on a busy machine).
    """

    def __init__(self, kusto: KustoStandIn) -> None:
        self.kusto = kusto

    def on_backoff(self, dependency: str, error: BaseException, attempt: int) -> None:
        if dependency == "record sink":
            self.kusto.recover()


def test_pump_rides_out_a_short_outage_without_redelivery(kusto: KustoStandIn) -> None:
    """Kusto back within the pump's backoff: the held batch is flushed and completed, no abandon."""
    source = MemorySource()
    send_requests(source, 30)
    kusto.fail_with(500)
    sink = kusto_sink(kusto.cluster_uri, DATABASE, mode="streaming", retry=FAST_RETRY)
    pump = bootstrap(
        source=source,
        publisher=MemoryPublisher(),
        sink=sink,
        registry=lambda: REGISTRY,
        config=PumpConfig(max_batch=50, min_backoff=0.05, max_backoff=0.2),
        observers=[RecoversAfterTheFirstFailedFlush(kusto)],
    )

    stats = pump.run(idle_exit=0)

    assert stats.completed == 30
    assert stats.abandoned == 0
    assert stats.downstream_retries == 1  # the outage was felt, once, and ridden out
    assert len(kusto.requests) == FAST_RETRY.attempts + 1
    assert {row["EventId"] for row in kusto.rows()} == {event_id_for(f"msg-{i}") for i in range(30)}
