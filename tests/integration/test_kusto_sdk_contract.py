"""The guard of :mod:`adapters.kusto.internals` still holds on the installed azure-kusto-data and -ingest.

The ingest clients' ``requests`` sessions are where the guard expects them *and* are the ones the
SDK sends through: capped at a fraction of a second, an ingestion into an endpoint that never
answers fails in the caller's thread instead of waiting out the SDK's own 10 minutes (or an hour,
for queued ingestion's management commands). ``make sdk-drill`` runs this file against the newest
release; what the guard does when it trips is in tests/unit/test_sdk_guards.py.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from adapters.kusto.internals import GUARDS, http_sessions
from adapters.kusto.sink import cap_transport_timeouts, connection_builder
from tests.integration.test_kusto_hang import NeverAnswers

pytestmark = pytest.mark.integration


def chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from or during."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@pytest.fixture(autouse=True)
def untripped() -> Iterator[None]:
    """The test starts with no guard tripped and must end with none tripped."""
    GUARDS.reset()
    yield
    assert GUARDS.tripped == frozenset(), f"guards tripped: {sorted(GUARDS.tripped)}"


@pytest.fixture(params=["KustoStreamingIngestClient", "QueuedIngestClient"])
def silent_client(request: pytest.FixtureRequest) -> Iterator[tuple[Any, NeverAnswers]]:
    """An ingest client of the installed SDK aimed at an endpoint that accepts and never answers."""
    import azure.kusto.ingest

    with NeverAnswers() as silent:
        client = getattr(azure.kusto.ingest, request.param)(connection_builder(silent.url))
        try:
            yield client, silent
        finally:
            client.close()


@pytest.mark.sdk_guard("transport timeouts")
@pytest.mark.timeout(120)  # without the cap each ingestion would wait minutes for the silent endpoint
def test_the_sessions_found_are_the_ones_the_sdk_sends_through(silent_client: tuple[Any, NeverAnswers]) -> None:
    """One session per ingest client; capped, the SDK's own request into silence gives up within the cap's reach."""
    from azure.kusto.data.data_format import DataFormat
    from azure.kusto.ingest import IngestionProperties, StreamDescriptor

    client, silent = silent_client
    sessions = http_sessions(client)
    assert len(sessions) == 1
    assert cap_transport_timeouts(client, 0.3) == 1
    properties = IngestionProperties(database="experiments", table="T", data_format=DataFormat.MULTIJSON)
    stream = StreamDescriptor(io.BytesIO(b'{"a": 1}\n'), source_id=uuid.uuid4(), size=9)
    with pytest.raises(Exception) as raised:  # noqa: PT011  (the SDK wraps what requests raised)
        client.ingest_from_stream(stream, properties)
    assert any(isinstance(cause, requests.ReadTimeout) for cause in chain(raised.value))
    assert silent.connections >= 1  # it was the SDK's request that reached the endpoint
