"""A local stand-in for Kusto ingestion, so azure-kusto-ingest's real code paths run against 127.0.0.1.

What it speaks, in the formats the SDK parses:

* **Streaming ingestion** — ``POST /v1/rest/ingest/{db}/{table}?streamFormat=…&mappingName=…`` with a
  gzip body; answered with the v1 result table the service returns.
* **Management** — ``POST /v1/rest/mgmt`` (``{"db": …, "csl": …}``), the commands queued ingestion
  needs: ``.get ingestion resources`` (Azurite container and queue URLs with SAS tokens, so the SDK
  uploads and enqueues there), ``.get kusto identity token`` and ``.show version``.
* **Queued ingestion** — a background loop drains the Azurite ingestion queue, downloads each blob
  (with the SAS the SDK put in the message), decompresses and parses it, and "ingests" the rows.

Rows go through the JSON ingestion mapping when one was loaded from deploy/kusto (``apply_kql``), so
tests also prove that the mapping file and the worker's rows agree; an unknown mapping name is then
refused with the service's error. Outage switches (``fail_with``, ``slow``, ``down``, ``recover``)
act on the HTTP endpoints; the queue drain keeps running, as the real service's would.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Self
from urllib.parse import parse_qs, unquote, urlsplit

from ._http import HttpStandIn, Request, Response

if TYPE_CHECKING:
    from .azurite import Azurite

Row = dict[str, object]

_TABLE_COMMAND = re.compile(r"\.create(?:-merge)?\s+table\s+(\w+)\s*\((.*?)\)", re.DOTALL)
_MAPPING_COMMAND = re.compile(
    r"\.create(?:-or-alter)?\s+table\s+(\w+)\s+ingestion\s+json\s+mapping\s+\"([^\"]+)\"\s*((?:'[^']*'\s*)+)",
    re.DOTALL,
)
_INGEST_PATH = re.compile(r"^/v1/rest/ingest/([^/]+)/([^/?]+)$")

CONTAINER = "ingest-temp"
INGESTION_QUEUE = "readyforaggregation-secured"
FAILED_QUEUE = "failedingestions"
SUCCESS_QUEUE = "successfulingestions"


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))


def table_columns_from_kql(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{table: [(column, type)]}`` from ``.create-merge table T (C: type, …)`` commands."""
    tables = {}
    for match in _TABLE_COMMAND.finditer(_strip_comments(text)):
        columns = []
        for part in match.group(2).split(","):
            name, _, kind = part.partition(":")
            columns.append((name.strip(), kind.strip()))
        tables[match.group(1)] = columns
    return tables


def json_mappings_from_kql(text: str) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """``{(table, mapping): [(column, path)]}`` from ``.create-or-alter table T ingestion json mapping``."""
    mappings = {}
    for match in _MAPPING_COMMAND.finditer(_strip_comments(text)):
        # KQL concatenates adjacent string literals: '[' '{…},' ']' is one JSON document.
        document = "".join(re.findall(r"'([^']*)'", match.group(3)))
        entries = json.loads(document)
        mappings[(match.group(1), match.group(2))] = [
            (entry["column"], (entry.get("Properties") or {}).get("Path") or entry.get("path", "")) for entry in entries
        ]
    return mappings


def _json_path(document: object, path: str) -> object:
    """The value at a simple ``$.a.b`` path (all the mapping uses), or None."""
    value = document
    for part in path.removeprefix("$").strip(".").split("."):
        if not part:
            continue
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _json_documents(text: str) -> Iterator[object]:
    """JSON values one after another (``json`` and ``multijson``: lines or pretty-printed objects)."""
    decoder = json.JSONDecoder()
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return
        value, index = decoder.raw_decode(text, index)
        yield value


def _v1_table(columns: list[tuple[str, str]], rows: Sequence[Sequence[object]]) -> dict[str, object]:
    """A one-table v1 REST response (the format KustoResponseDataSetV1 parses)."""
    return {
        "Tables": [
            {
                "TableName": "Table_0",
                "Columns": [
                    {"ColumnName": name, "DataType": kind, "ColumnType": kind.lower()} for name, kind in columns
                ],
                "Rows": rows,
            }
        ]
    }


def _kusto_error(status: int, code: str, message: str, permanent: bool) -> Response:
    return Response.json(
        status,
        {
            "error": {
                "code": code,
                "message": message,
                "@type": f"Kusto.Standin.{code}",
                "@message": message,
                "@permanent": permanent,
            }
        },
    )


@dataclass(frozen=True, slots=True)
class Ingestion:
    """One batch the stand-in ingested."""

    path: str  # "streaming" or "queued"
    database: str
    table: str
    mapping: str | None
    rows: int


class KustoStandIn(HttpStandIn):
    """Kusto's streaming-ingest and management endpoints on 127.0.0.1, plus a queued-ingestion drain."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, azurite: Azurite | None = None) -> None:
        super().__init__(host, port)
        self.azurite = azurite
        self._tables: dict[str, list[Row]] = {}
        self._schemas: dict[str, list[tuple[str, str]]] = {}
        self._mappings: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.ingestions: list[Ingestion] = []
        self.errors: list[str] = []
        self.commands: list[str] = []
        self._drain_stop = threading.Event()
        self._drain_thread: threading.Thread | None = None
        self._resources: list[list[str]] = []

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Serve HTTP; with Azurite, create the ingestion container and queues and start draining."""
        super().start()
        if self.azurite is not None and self._drain_thread is None:
            self._prepare_storage()
            self._drain_stop.clear()
            self._drain_thread = threading.Thread(target=self._drain_loop, name="kusto-standin-drain", daemon=True)
            self._drain_thread.start()
        return self

    def stop(self) -> None:
        """Stop the drain loop and the HTTP server."""
        self._drain_stop.set()
        if self._drain_thread is not None:
            self._drain_thread.join(timeout=5)
            self._drain_thread = None
        super().stop()

    def down(self) -> None:
        """Refuse connections (the drain loop keeps running) until :meth:`recover`."""
        HttpStandIn.stop(self)

    @property
    def cluster_uri(self) -> str:
        """The URI to give the SDK (query and ingestion endpoints are the same host here)."""
        return self.url

    # -- schema --------------------------------------------------------------------------

    def apply_kql(self, source: str | Path) -> None:
        """Load ``.create-merge table`` and ``… ingestion json mapping`` commands (a file or text)."""
        text = Path(source).read_text() if isinstance(source, Path) else source
        with self._lock:
            self._schemas.update(table_columns_from_kql(text))
            self._mappings.update(json_mappings_from_kql(text))

    # -- reading back --------------------------------------------------------------------

    def rows(self, table: str = "AssignmentEvents") -> list[Row]:
        """Every row ingested into ``table`` so far."""
        with self._lock:
            return list(self._tables.get(table, []))

    def wait_for_rows(self, n: int, timeout: float = 10.0, table: str = "AssignmentEvents") -> bool:
        """Wait until ``table`` holds at least ``n`` rows; False on timeout."""
        return self.wait_for(lambda: len(self.rows(table)) >= n, timeout)

    def clear(self) -> None:
        """Forget rows, batches, commands, errors and recorded requests (schema and mappings stay)."""
        with self._lock:
            self._tables.clear()
            self.ingestions.clear()
            self.errors.clear()
            self.commands.clear()
            self.requests.clear()

    # -- HTTP ----------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Route streaming ingestion and management commands."""
        parts = urlsplit(request.path)
        if request.method != "POST":
            return _kusto_error(405, "MethodNotAllowed", f"{request.method} is not supported", True)
        if parts.path == "/v1/rest/mgmt":
            return self._management(request)
        match = _INGEST_PATH.match(parts.path)
        if match:
            query = parse_qs(parts.query)
            return self._streaming(
                unquote(match.group(1)),
                unquote(match.group(2)),
                query.get("streamFormat", ["json"])[0],
                query.get("mappingName", [None])[0],
                request.body,
            )
        return _kusto_error(404, "NotFound", f"the stand-in does not serve {parts.path}", True)

    def _streaming(self, database: str, table: str, fmt: str, mapping: str | None, body: bytes) -> Response:
        try:
            count = self._ingest("streaming", database, table, fmt=fmt.lower(), mapping=mapping, body=body)
        except _IngestError as exc:
            return _kusto_error(400, exc.code, str(exc), True)
        columns = [
            ("ConsumedRecordsCount", "Int64"),
            ("UpdatePolicyStatus", "String"),
            ("UpdatePolicyFailureCode", "String"),
            ("UpdatePolicyFailureReason", "String"),
        ]
        return Response.json(200, _v1_table(columns, [[count, "Inactive", "Unknown", None]]))

    def _management(self, request: Request) -> Response:
        try:
            command = str(json.loads(request.body or b"{}").get("csl", "")).strip()
        except json.JSONDecodeError:
            return _kusto_error(400, "BadRequest", "the body is not JSON", True)
        with self._lock:
            self.commands.append(command)
        normalized = " ".join(command.lower().split())
        if normalized == ".get ingestion resources":
            if not self._resources:
                return _kusto_error(
                    500, "NoIngestionResources", "the stand-in was started without Azurite: no queued ingestion", False
                )
            return Response.json(
                200, _v1_table([("ResourceTypeName", "String"), ("StorageRoot", "String")], self._resources)
            )
        if normalized == ".get kusto identity token":
            token = base64.b64encode(f"standin-authorization-context-{uuid.uuid4()}".encode()).decode()
            return Response.json(200, _v1_table([("AuthorizationContext", "String")], [[token]]))
        if normalized == ".show version":
            columns = [("BuildVersion", "String"), ("BuildTime", "DateTime"), ("ServiceType", "String")]
            return Response.json(200, _v1_table(columns, [["1.0.0.0", "2026-01-01T00:00:00Z", "DataManagement"]]))
        return _kusto_error(400, "BadRequest", f"the stand-in does not run {command[:80]!r}", True)

    # -- ingestion -----------------------------------------------------------------------

    def _ingest(self, path: str, database: str, table: str, *, fmt: str, mapping: str | None, body: bytes) -> int:
        if body[:2] == b"\x1f\x8b":  # queued blobs arrive still gzipped; HTTP bodies were decoded already
            body = gzip.decompress(body)
        if fmt not in {"json", "multijson"}:
            raise _IngestError("BadRequest_UnsupportedFormat", f"the stand-in ingests json/multijson, not {fmt!r}")
        try:
            documents = list(_json_documents(body.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _IngestError("BadRequest_InvalidJson", f"ingestion data is not JSON: {exc}") from None
        with self._lock:
            columns = self._mapping_for(database, table, mapping)
            rows = [self._row(document, columns) for document in documents]
            self._tables.setdefault(table, []).extend(rows)
            self.ingestions.append(Ingestion(path, database, table, mapping, len(rows)))
        self._notify()
        return len(rows)

    def _mapping_for(self, database: str, table: str, mapping: str | None) -> list[tuple[str, str]] | None:
        if mapping is None or not self._mappings:
            return None  # no mappings loaded: keep each document as it came
        columns = self._mappings.get((table, mapping))
        if columns is None:
            raise _IngestError(
                "BadRequest_MappingReferenceWasNotFound",
                f"Mapping reference '{mapping}' of kind 'Json' in database '{database}' could not be found.",
            )
        return columns

    @staticmethod
    def _row(document: object, columns: list[tuple[str, str]] | None) -> Row:
        if columns is None:
            return dict(document) if isinstance(document, dict) else {"value": document}
        return {column: _json_path(document, path) for column, path in columns}

    # -- queued ingestion through Azurite ------------------------------------------------

    def _prepare_storage(self) -> None:
        from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
        from azure.storage.queue import QueueSasPermissions, QueueServiceClient, generate_queue_sas

        from .azurite import DEV_ACCOUNT, DEV_ACCOUNT_KEY

        azurite = self.azurite
        assert azurite is not None
        expiry = datetime.now(UTC) + timedelta(days=1)
        with BlobServiceClient.from_connection_string(azurite.connection_string) as blobs:
            if not blobs.get_container_client(CONTAINER).exists():
                blobs.create_container(CONTAINER)
        with QueueServiceClient.from_connection_string(azurite.connection_string) as queues:
            existing = {q.name for q in queues.list_queues()}
            for name in (INGESTION_QUEUE, FAILED_QUEUE, SUCCESS_QUEUE):
                if name not in existing:
                    queues.create_queue(name)
        container_sas = generate_container_sas(
            DEV_ACCOUNT,
            CONTAINER,
            account_key=DEV_ACCOUNT_KEY,
            permission=ContainerSasPermissions(read=True, add=True, create=True, write=True, list=True),
            expiry=expiry,
        )

        def queue_url(name: str) -> str:
            sas = generate_queue_sas(
                DEV_ACCOUNT,
                name,
                account_key=DEV_ACCOUNT_KEY,
                permission=QueueSasPermissions(read=True, add=True, update=True, process=True),
                expiry=expiry,
            )
            return f"{azurite.queue_endpoint}/{name}?{sas}"

        self._resources = [
            ["SecuredReadyForAggregationQueue", queue_url(INGESTION_QUEUE)],
            ["FailedIngestionsQueue", queue_url(FAILED_QUEUE)],
            ["SuccessfulIngestionsQueue", queue_url(SUCCESS_QUEUE)],
            ["TempStorage", f"{azurite.blob_endpoint}/{CONTAINER}?{container_sas}"],
            # Only used for ingestion status reporting, which the worker does not ask for.
            ["IngestionsStatusTable", f"{azurite.table_endpoint}/ingestionsstatus00000000?{container_sas}"],
        ]

    def _drain_loop(self) -> None:
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy

        azurite = self.azurite
        assert azurite is not None
        queue = QueueClient.from_connection_string(
            azurite.connection_string, INGESTION_QUEUE, message_decode_policy=TextBase64DecodePolicy()
        )
        with queue:
            while not self._drain_stop.is_set():
                try:
                    messages = list(queue.receive_messages(max_messages=32, visibility_timeout=30))
                    for message in messages:
                        self._ingest_queued(str(message.content))
                        queue.delete_message(message)
                    handled = len(messages)
                except Exception as exc:  # a stand-in must keep draining; tests read self.errors
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    handled = 0
                if not handled:
                    self._drain_stop.wait(0.05)

    def _ingest_queued(self, content: str) -> None:
        from azure.storage.blob import BlobClient

        info = json.loads(content)
        properties = info.get("AdditionalProperties") or {}
        with BlobClient.from_blob_url(info["BlobPath"]) as blob:
            data = blob.download_blob().readall()
        try:
            self._ingest(
                "queued",
                info["DatabaseName"],
                info["TableName"],
                fmt=str(properties.get("format", "json")),
                mapping=properties.get("ingestionMappingReference"),
                body=data,
            )
        except _IngestError as exc:
            with self._lock:
                self.errors.append(f"{exc.code}: {exc}")


class _IngestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
