"""File-backed ports, so the pump runs for real from the command line without a broker.

``JsonLinesSource`` reads requests (one JSON object per line); ``JsonLinesPublisher`` writes events;
``JsonLinesSink`` writes Kusto-shaped rows (what ``ab-worker report`` reads); dead letters go to a
JSON-lines file with their reason and description, in the same shape ``dlq export`` writes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from schemas.models import AssignmentRecord
from worker.service.ports import Delivery, OutboundEvent, SettlementLostError, complete_each


class JsonLinesSource:
    """Requests from a JSON-lines file. The message id is ``<file name>:<line number>``."""

    def __init__(self, path: Path, dead_letter_stream: IO[str] | None = None) -> None:
        self.path = path
        self._file = path.open("rb")
        self._lines = enumerate(self._file, start=1)
        self._dead_letter_stream = dead_letter_stream
        self.completed = 0
        self.dead_lettered = 0
        self.abandoned: list[Delivery] = []

    def receive(self, max_messages: int, max_wait: float) -> Sequence[Delivery]:
        """The next ``max_messages`` non-blank lines."""
        batch: list[Delivery] = []
        for number, line in self._lines:
            body = line.rstrip(b"\r\n")
            if not body.strip():
                continue
            batch.append(
                Delivery(
                    body=body,
                    message_id=f"{self.path.name}:{number}",
                    delivery_count=1,
                    handle=number,
                )
            )
            if len(batch) >= max_messages:
                break
        return batch

    def complete(self, delivery: Delivery) -> None:
        """Count it."""
        self.completed += 1

    def complete_batch(self, deliveries: Sequence[Delivery]) -> dict[int, SettlementLostError]:
        """Complete each in turn."""
        return complete_each(self, deliveries)

    def dead_letter(self, delivery: Delivery, reason: str, description: str) -> None:
        """Write it to the dead-letter file with its line number, reason and description."""
        self.dead_lettered += 1
        if self._dead_letter_stream is not None:
            record = dead_letter_record(delivery, reason, description)
            record["line"] = delivery.handle
            self._dead_letter_stream.write(json.dumps(record, ensure_ascii=False) + "\n")

    def abandon(self, delivery: Delivery) -> None:
        """A file cannot redeliver: keep it so the command can report and fail."""
        self.abandoned.append(delivery)

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def body_fields(body: bytes) -> dict[str, str]:
    """``{"body": text}`` when the bytes are UTF-8, else ``{"body_base64": ...}`` (the export format)."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def dead_letter_record(delivery: Delivery, reason: str, description: str) -> dict[str, Any]:
    """A dead-lettered message as JSON, in the same shape ``dlq export`` writes."""
    return {
        "message_id": delivery.message_id,
        "dead_letter_reason": reason,
        "dead_letter_error_description": description,
        **body_fields(delivery.body),
    }


class JsonLinesPublisher:
    """Events, one JSON object per line, to a stream."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.published = 0

    def publish(self, events: Sequence[OutboundEvent]) -> None:
        """Write each event body as a line."""
        self._stream.write("".join(event.body.decode() + "\n" for event in events))
        self.published += len(events)

    def close(self) -> None:
        """Flush the stream (it is owned by the caller)."""
        self._stream.flush()


class JsonLinesSink:
    """Kusto-shaped rows appended to a JSON-lines file; durable once :meth:`flush` returns."""

    def __init__(self, path: Path | None, max_rows: int = 1000) -> None:
        self._file = path.open("a", encoding="utf-8") if path is not None else None
        self._buffer: list[AssignmentRecord] = []
        self.max_rows = max_rows
        self.rows_written = 0

    def add(self, records: Sequence[AssignmentRecord]) -> None:
        """Buffer rows."""
        self._buffer.extend(records)

    def due(self) -> bool:
        """Due by size."""
        return len(self._buffer) >= self.max_rows

    def flush(self) -> None:
        """Append the buffer and fsync-free flush (a local file is as durable as it gets here)."""
        buffered, self._buffer = self._buffer, []
        if self._file is not None and buffered:
            self._file.write("".join(r.model_dump_json() + "\n" for r in buffered))
            self._file.flush()
        self.rows_written += len(buffered)

    def close(self) -> None:
        """Flush and close the file."""
        self.flush()
        if self._file is not None:
            self._file.close()
