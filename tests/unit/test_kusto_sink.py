"""KustoSink's buffering, retry and error policy, with a recording ingest client (no HTTP)."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from adapters.kusto.sink import KustoSink, RetryPolicy
from schemas.models import AssignmentRecord
from worker.domain.errors import TransientError


class RecordingClient:
    """Keeps what would have been ingested; ``failures`` makes the next attempts raise."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[list[dict[str, Any]]] = []
        self.closed = False

    def ingest_from_stream(self, stream_descriptor: Any, ingestion_properties: Any) -> None:
        """Record the rows, or fail as configured."""
        if self.failures:
            self.failures -= 1
            raise ConnectionError("refused (https://c/x?sig=SECRET)")
        data = stream_descriptor.stream.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        self.batches.append([json.loads(line) for line in data.splitlines()])

    def close(self) -> None:
        """Mark closed."""
        self.closed = True


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def row(i: int) -> AssignmentRecord:
    """A minimal row."""
    return AssignmentRecord(
        EventId=f"e{i}",
        AssignedAt=datetime(2026, 1, 1, tzinfo=UTC),
        ExperimentId="x",
        ExperimentVersion="1",
        UserId=f"u{i}",
        VariantId="A",
        HashValue=0.5,
        Segment="",
        Strategy="md5_hash",
        Seed="s",
        SplitRatio={"A": 1.0},
        VariantMetadata={},
        Context={},
        RequestId="",
        CorrelationId="c",
        SchemaVersion="1.0",
        ExperimentArm="",
        CohortId="",
        InExperiment=True,
        Reason="bucketed",
        ConfigVersion="5e1f0c2d9a8b7c6d",
    )


def sink_with(client: RecordingClient, **options: Any) -> tuple[KustoSink, Clock, list[float]]:
    """A sink on ``client`` with a fake clock and a sleep that records its delays."""
    clock, sleeps = Clock(), list[float]()
    sink = KustoSink(client, "db", clock=clock, sleep=sleeps.append, **options)
    return sink, clock, sleeps


def test_due_by_size_or_age_of_the_oldest_row() -> None:
    """due(): never when empty; at max_rows; or when the oldest row reaches max_age."""
    sink, clock, _ = sink_with(RecordingClient(), max_rows=3, max_age=2.0)
    assert not sink.due()
    sink.add([row(1)])
    clock.now += 1.0
    sink.add([row(2)])
    assert not sink.due()
    clock.now += 1.0  # the first row is now 2 s old, the second 1 s
    assert sink.due()
    sink.flush()
    sink.add([row(3), row(4), row(5)])
    assert sink.due()


def test_flush_sends_json_lines_of_model_dump_and_empties_the_buffer() -> None:
    """One flush, one batch, rows as model_dump(mode="json")."""
    client = RecordingClient()
    sink, _, _ = sink_with(client)
    sink.add([row(1), row(2)])
    sink.flush()
    sink.flush()  # nothing buffered: no call
    assert client.batches == [[row(1).model_dump(mode="json"), row(2).model_dump(mode="json")]]
    assert sink.rows_ingested == 2


def test_retries_with_bounded_jittered_backoff_then_succeeds() -> None:
    """Two failures then success: two backoff sleeps, each within the policy's cap."""
    client = RecordingClient(failures=2)
    sink, _, sleeps = sink_with(client, retry=RetryPolicy(attempts=3, base_delay=0.5, max_delay=0.6))
    sink.add([row(1)])
    sink.flush()
    assert len(client.batches) == 1
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5
    assert 0 <= sleeps[1] <= 0.6
    assert sink.failed_attempts == 2


def test_gives_up_with_a_transient_error_without_secrets_and_drops_the_buffer() -> None:
    """All attempts failing: TransientError naming the table, SAS redacted, buffer dropped."""
    client = RecordingClient(failures=5)
    sink, _, _ = sink_with(client, retry=RetryPolicy(attempts=3))
    sink.add([row(1), row(2)])
    with pytest.raises(TransientError) as raised:
        sink.flush()
    message = str(raised.value)
    assert "2 rows into db.AssignmentEvents failed after 3 attempts" in message
    assert "SECRET" not in message
    assert sink.buffered == 0
    assert client.failures == 2


def test_large_buffers_are_split_under_the_request_limit() -> None:
    """Batches over max_request_bytes go as several requests, each under the limit."""
    client = RecordingClient()
    line_size = len(json.dumps(row(1).model_dump(mode="json"), separators=(",", ":"))) + 1
    sink, _, _ = sink_with(client, max_request_bytes=line_size * 2)
    sink.add([row(i) for i in range(5)])
    sink.flush()
    assert [len(batch) for batch in client.batches] == [2, 2, 1]


def test_close_flushes_and_closes_the_client() -> None:
    """close() flushes what is left, then closes the SDK client; a second close does nothing."""
    client = RecordingClient()
    sink, _, _ = sink_with(client)
    sink.add([row(1)])
    sink.close()
    sink.close()
    assert len(client.batches) == 1
    assert client.closed
