"""Kusto (Azure Data Explorer) record sink: buffered, batched ingestion through azure-kusto-ingest.

:class:`KustoSink` implements :class:`worker.service.ports.RecordSink`. Rows are buffered and flushed by size
(``max_rows``) and by age (``max_age`` seconds since the oldest buffered row). A flush ingests the
buffer as JSON lines (``multijson``) of ``AssignmentRecord.model_dump(mode="json")`` with the
pre-created JSON mapping ``AssignmentEvents_json_mapping`` (deploy/kusto/mapping.kql), so the row's
shape is owned by one model and one mapping, never by column order.

Two ingestion paths, same sink:

* ``queued`` (production default): ``QueuedIngestClient`` asks the cluster's data-management
  endpoint for its ingestion resources (``.get ingestion resources``, ``.get kusto identity token``),
  uploads the gzipped batch to one of its blob containers and posts a message to its ingestion queue.
  "Durable" means *accepted by the queue*: Kusto then loads it within its batching policy (minutes by
  default; rows are not queryable at once).
* ``streaming``: ``KustoStreamingIngestClient`` posts the gzipped batch to
  ``/v1/rest/ingest/{db}/{table}``; rows are queryable within seconds. Needs streaming ingestion
  enabled on the cluster or table; batches are split to stay under the 4 MB request limit.

Failures: each attempt has a deadline (``attempt_timeout``), kept two ways. The SDK's HTTP requests
(streaming ingestion, and the management commands queued ingestion starts with) get it as their real
connect and read timeouts: the SDK's own are minutes long (10 min for streaming plus 30 s slack, 1 h
for management) and cannot be set per call, so :func:`cap_transport_timeouts` wraps the transport of
the SDK's HTTP sessions (which only the SDK's private attributes reach, in
:mod:`adapters.kusto.internals`: if the SDK changes shape its guard logs a WARNING and the sink
carries on with the second way alone). And each attempt runs in a helper thread the caller waits on
for the deadline: that also bounds what the transport cannot, such as the storage upload of queued
ingestion. At most one attempt thread exists per sink: while an abandoned attempt is still waiting
for an answer, no new one starts (the flush fails fast as transient instead), so a hung endpoint
cannot pile up threads. An abandoned attempt that later succeeds makes its rows arrive twice, which
the EventId dedup view absorbs. Attempts are retried with exponential backoff and full jitter up to
``attempts`` times; then :meth:`KustoSink.flush` raises
:class:`~worker.domain.errors.TransientError` and drops the buffer, as the ``RecordSink`` contract
says, so the pump abandons (or keeps holding) those messages and they come back: rows are never
silently lost. SDK exceptions are translated here and their text goes through
:func:`worker.service.redaction.redact` (storage errors carry SAS URLs).

Authentication: ``https://`` endpoints use AAD through an azure-identity credential
(``DefaultAzureCredential`` — workload or managed identity in production — unless one is given).
``http://`` endpoints use no authentication: the SDK allows that only over plain http, which only
the local stand-in and the Kusto emulator speak.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from adapters.kusto.internals import http_sessions
from adapters.rowbuffer import BufferedRows
from schemas.models import AssignmentRecord
from worker.domain.errors import ConfigurationError, TransientError
from worker.domain.plural import counted
from worker.service.redaction import redact

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.kusto.data import KustoConnectionStringBuilder
    from azure.kusto.ingest import IngestionProperties, StreamDescriptor
    from requests import PreparedRequest, Response
    from requests.adapters import BaseAdapter

log = logging.getLogger(__name__)

#: The table's JSON ingestion mapping, created by deploy/kusto/mapping.kql.
MAPPING_NAME = "AssignmentEvents_json_mapping"
DEFAULT_TABLE = "AssignmentEvents"
#: Streaming ingestion refuses requests over 4 MB (uncompressed); stay clear of it.
STREAMING_MAX_BYTES = 3_500_000
#: Queued batches are uploaded as one blob each; Kusto recommends 100 MB–1 GB uncompressed at most.
QUEUED_MAX_BYTES = 64_000_000
_MAX_ERROR_CHARS = 500
#: How much longer than ``attempt_timeout`` the caller waits, so the transport's timeout fires first.
_TIMEOUT_GRACE = 0.25

IngestMode = Literal["queued", "streaming"]


class IngestClient(Protocol):
    """The slice of azure-kusto-ingest's clients the sink uses (both queued and streaming have it)."""

    def ingest_from_stream(
        self, stream_descriptor: StreamDescriptor, ingestion_properties: IngestionProperties
    ) -> object:
        """Ingest one stream of rows (what it returns is not read: a failure raises)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one :meth:`KustoSink.flush` tries before it gives up with ``TransientError``.

    The defaults give up after 3 quick failures in about a second, or 3 hung attempts in ~16 s; the
    pump then holds the messages and retries the flush with its own, longer backoff.
    """

    attempts: int = 3
    base_delay: float = 0.25
    max_delay: float = 2.0
    attempt_timeout: float = 5.0

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


class _AttemptTimeoutError(Exception):
    pass


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    text = redact(" ".join(text.split()))
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def encode_rows(records: Sequence[AssignmentRecord]) -> bytes:
    """JSON lines, one ``AssignmentRecord.model_dump(mode="json")`` per line (Kusto ``multijson``)."""
    return b"".join(
        json.dumps(r.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        for r in records
    )


def _chunks(records: Sequence[AssignmentRecord], max_bytes: int) -> Iterator[bytes]:
    chunk = bytearray()
    for record in records:
        line = encode_rows([record])
        if chunk and len(chunk) + len(line) > max_bytes:
            yield bytes(chunk)
            chunk = bytearray()
        chunk += line
    if chunk:
        yield bytes(chunk)


class KustoSink(BufferedRows):
    """A :class:`~worker.service.ports.RecordSink` that ingests rows into a Kusto table in batches."""

    def __init__(
        self,
        client: IngestClient,
        database: str,
        table: str = DEFAULT_TABLE,
        *,
        mapping_name: str = MAPPING_NAME,
        max_rows: int = 500,
        max_age: float = 2.0,
        max_request_bytes: int = QUEUED_MAX_BYTES,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(max_rows, max_age, clock, "Kusto sink")
        from azure.kusto.data.data_format import DataFormat
        from azure.kusto.ingest import IngestionProperties

        self._client = client
        self.database = database
        self.table = table
        self.max_request_bytes = max_request_bytes
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._properties = IngestionProperties(
            database=database,
            table=table,
            data_format=DataFormat.MULTIJSON,
            ingestion_mapping_reference=mapping_name,
        )
        self._closed = False
        self._attempt: threading.Thread | None = None
        #: Counters for tests and the health endpoint.
        self.rows_ingested = 0
        self.failed_attempts = 0

    # -- RecordSink ----------------------------------------------------------------------

    def flush(self) -> None:
        """Ingest every buffered row, or raise :class:`TransientError` having dropped the buffer."""
        rows = self._take()
        if not rows:
            return
        for payload in _chunks(rows, self.max_request_bytes):
            self._ingest_with_retries(payload, len(rows))
        self.rows_ingested += len(rows)

    def close(self) -> None:
        """Flush what is left (raising as :meth:`flush` does), then close the SDK client."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            try:
                self._client.close()
            except Exception:  # closing must not hide the flush outcome
                log.debug("Error closing the Kusto client", exc_info=True)

    # -- attempts ------------------------------------------------------------------------

    def _ingest_with_retries(self, payload: bytes, row_count: int) -> None:
        last: BaseException | None = None
        for attempt in range(1, self.retry.attempts + 1):
            if attempt > 1:
                self._sleep(self.retry.delay(attempt - 1))
            try:
                self._bounded(lambda: self._ingest_once(payload), self.retry.attempt_timeout)
                return
            except Exception as exc:
                last = exc
                self.failed_attempts += 1
                log.info(
                    "Kusto ingestion attempt %d/%d into %s.%s failed: %s",
                    attempt,
                    self.retry.attempts,
                    self.database,
                    self.table,
                    _describe(exc),
                )
        assert last is not None
        raise TransientError(
            f"Kusto ingestion of {counted(row_count, 'row')} into {self.database}.{self.table} failed after "
            f"{counted(self.retry.attempts, 'attempt')}: {_describe(last)}"
        ) from None

    def _ingest_once(self, payload: bytes) -> None:
        from azure.kusto.ingest import StreamDescriptor

        # A fresh stream (and source id) per attempt: the SDK consumes and compresses the stream.
        descriptor = StreamDescriptor(io.BytesIO(payload), source_id=uuid.uuid4(), size=len(payload))
        self._client.ingest_from_stream(descriptor, self._properties)

    def _bounded(self, action: Callable[[], None], timeout: float) -> None:
        """Run ``action`` in the sink's one attempt thread; raise its exception, or a timeout.

        A previous attempt still hung after its own deadline blocks new ones: the flush fails as
        transient at once rather than start a second thread behind the same dead endpoint.
        """
        previous = self._attempt
        if previous is not None and previous.is_alive():
            previous.join(timeout)
            if previous.is_alive():
                raise _AttemptTimeoutError(
                    f"the previous attempt has had no answer for over {2 * timeout:g} s; not starting another"
                )
        outcome: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                action()
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)
            finally:
                done.set()

        self._attempt = threading.Thread(target=run, name="kusto-ingest", daemon=True)
        self._attempt.start()
        # A little past the transport's own timeout, so its precise error wins when it has one.
        if not done.wait(timeout + _TIMEOUT_GRACE):
            raise _AttemptTimeoutError(f"no answer within {timeout:g} s")
        if outcome:
            raise outcome[0]


def connection_builder(uri: str, credential: TokenCredential | None = None) -> KustoConnectionStringBuilder:
    """A ``KustoConnectionStringBuilder``: AAD for https (``credential`` or DefaultAzureCredential), none for http."""
    from azure.kusto.data import KustoConnectionStringBuilder

    if uri.startswith("http://"):
        if credential is not None:
            raise ConfigurationError("a Kusto credential needs an https:// endpoint; http:// is only for emulators")
        return KustoConnectionStringBuilder.with_no_authentication(uri)
    if not uri.startswith("https://"):
        raise ConfigurationError(f"Kusto endpoint must start with https:// (or http:// for an emulator): {uri!r}")
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return KustoConnectionStringBuilder.with_azure_token_credential(uri, credential=credential)


def kusto_sink(
    ingest_uri: str,
    database: str,
    table: str = DEFAULT_TABLE,
    *,
    mode: IngestMode = "queued",
    credential: TokenCredential | None = None,
    mapping_name: str = MAPPING_NAME,
    max_rows: int = 500,
    max_age: float = 2.0,
    retry: RetryPolicy | None = None,
) -> KustoSink:
    """Build a :class:`KustoSink` for the composition root.

    ``ingest_uri`` may be the cluster's query URI or its ``ingest-`` (data management) URI: the SDK
    adds or removes the ``ingest-`` prefix for the mode (not for IP addresses or localhost).
    ``credential`` is an azure-identity ``TokenCredential`` (default ``DefaultAzureCredential``).
    """
    from azure.kusto.ingest import KustoStreamingIngestClient, QueuedIngestClient

    builder = connection_builder(ingest_uri, credential)
    client: IngestClient
    if mode == "queued":
        client = QueuedIngestClient(builder)
        max_bytes = QUEUED_MAX_BYTES
    elif mode == "streaming":
        client = KustoStreamingIngestClient(builder)
        max_bytes = STREAMING_MAX_BYTES
    else:
        raise ConfigurationError(f"unknown Kusto ingestion mode {mode!r}; expected queued or streaming")
    cap_transport_timeouts(client, (retry or RetryPolicy()).attempt_timeout)
    return KustoSink(
        client,
        database,
        table,
        mapping_name=mapping_name,
        max_rows=max_rows,
        max_age=max_age,
        max_request_bytes=max_bytes,
        retry=retry,
    )


class _DeadlineAdapter:
    """A requests transport adapter that caps every call's connect and read timeouts."""

    def __init__(self, inner: BaseAdapter, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    def send(self, request: PreparedRequest, **kwargs: Any) -> Response:  # kwargs: requests' own, passed on
        """Send through the SDK's own adapter with the timeout capped at ``seconds``."""
        timeout = kwargs.get("timeout")
        if isinstance(timeout, tuple):
            connect, read = timeout
        else:
            connect = read = timeout
        kwargs["timeout"] = (_cap(connect, self.seconds), _cap(read, self.seconds))
        return self.inner.send(request, **kwargs)

    def close(self) -> None:
        """Close the SDK's adapter."""
        self.inner.close()


def _cap(value: float | None, seconds: float) -> float:
    return seconds if value is None else min(float(value), seconds)


def cap_transport_timeouts(client: IngestClient, seconds: float) -> int:
    """Give the SDK's HTTP calls real connect/read timeouts of ``seconds``; returns the sessions capped.

    0 when the SDK's sessions cannot be reached (the ``transport timeouts`` guard of
    :mod:`adapters.kusto.internals` said so): attempts stay bounded by the sink's helper thread alone.
    """
    sessions = http_sessions(client)
    for session in sessions:
        for prefix in ("http://", "https://"):
            adapter = session.get_adapter(prefix)
            if not isinstance(adapter, _DeadlineAdapter):
                session.mount(prefix, _DeadlineAdapter(adapter, seconds))  # type: ignore[arg-type]
    return len(sessions)
