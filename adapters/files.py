"""File-backed ports, so the pump runs for real from the command line without a broker.

``JsonLinesSource`` reads requests (one JSON object per line); ``JsonLinesPublisher`` writes events;
``JsonLinesSink`` writes Kusto-shaped rows (what ``ab-worker report`` reads) in whole lines;
dead letters go to a JSON-lines file with their reason and description, in the same shape
``dlq export`` writes.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from adapters.rowbuffer import BufferedRows
from adapters.settlement import complete_each
from worker.domain.errors import ConfigurationError, TransientError
from worker.domain.plural import counted
from worker.service.handling import Handled
from worker.service.observe import Disposition, PumpObserver, Settlement
from worker.service.ports import Delivery, OutboundEvent

log = logging.getLogger(__name__)


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

    def complete_batch(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Complete each in turn."""
        return complete_each(self.complete, deliveries)

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


def dead_letter_record(delivery: Delivery, reason: str, description: str) -> dict[str, object]:
    """A dead-lettered message as JSON, in the same shape ``dlq export`` writes."""
    return {
        "message_id": delivery.message_id,
        "dead_letter_reason": reason,
        "dead_letter_error_description": description,
        **body_fields(delivery.body),
    }


class DeadLetterCopies(PumpObserver):
    """Each request the broker took as a dead letter, also written to a JSON-lines stream in ``dlq export``'s shape.

    ``run --dead-letters FILE`` on a broker: the dead-letter queue keeps the messages (replay them
    from there); the file is this run's copy, for ``report --dead-letters`` and for reading without a
    broker. A line is written once the broker has accepted the dead-lettering: a refused settlement
    is redelivered, not copied. A failed write is logged once and never stops the pump.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.written = 0
        self._failed = False

    def on_settled(self, delivery: Delivery, settlement: Settlement, handled: Handled | None) -> None:
        if settlement.disposition is not Disposition.DEAD_LETTER:
            return
        record = dead_letter_record(delivery, settlement.reason, settlement.description)
        try:
            self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._stream.flush()
        except OSError as exc:
            if not self._failed:
                log.warning("Dead-letter copies are no longer written (%s); the dead-letter queue has them all", exc)
            self._failed = True
            return
        self.written += 1


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


class JsonLinesSink(BufferedRows):
    """Kusto-shaped rows appended to a JSON-lines file (or only counted, with no path).

    Durable once :meth:`flush` returns, against a crash of the process: every flush hands whole lines
    to the kernel with ``os.write`` (no fsync: 5 ms per flush here would cost the pump about a sixth
    of its throughput; a host crash can lose the last rows, which is why production uses Kusto). A full,
    read-only or otherwise failing disk is a downstream outage like any other: :meth:`flush` undoes
    its partial write (truncating back to the last whole line) and raises
    :class:`~worker.domain.errors.TransientError`, so the pump holds the messages and retries until
    the disk recovers. A torn last line left by a crash or a failed truncate is cut off (with a
    WARNING) before anything new is written, so a row is never glued onto half of another.

    Due by size (``max_rows``) or by age (``max_age`` seconds since the oldest buffered row), as the
    Kusto sink is, so a trickle of requests is written and settled within ``max_age``.
    """

    def __init__(
        self,
        path: Path | None,
        max_rows: int = 1000,
        max_age: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_rows, max_age, clock, "rows sink")
        self.path = path
        self._fd: int | None = None
        self._regular = False
        #: False while the file may end in a partial line (a failed write we could not undo).
        self._whole = True
        self.rows_written = 0
        self.failed_flushes = 0
        if path is not None:
            self._open_at_start(path)

    def _open_at_start(self, path: Path) -> None:
        try:
            self._open()
        except OSError as exc:
            if exc.errno not in _OUTAGE_ERRNOS:
                raise ConfigurationError(f"{path}: cannot open the rows file ({exc.strerror})") from None
            # A full or read-only disk at start-up is an outage, not a configuration error: flush
            # keeps retrying (and readiness says so) until the file can be written.
            log.warning("Rows file %s is not writable yet (%s); rows are held until it is", path, exc.strerror)

    # -- RecordSink ----------------------------------------------------------------------

    def flush(self) -> None:
        """Append the buffer as whole lines, or raise ``TransientError`` having dropped it."""
        buffered = self._take()
        if not buffered:
            return
        if self.path is not None:
            payload = "".join(r.model_dump_json() + "\n" for r in buffered).encode("utf-8")
            try:
                self._append(payload)
            except OSError as exc:
                self.failed_flushes += 1
                raise TransientError(
                    f"rows file {self.path}: cannot write {counted(len(buffered), 'row')} ({exc.strerror or exc})"
                ) from None
        self.rows_written += len(buffered)

    def close(self) -> None:
        """Flush and close the file (raising as :meth:`flush` does)."""
        try:
            self.flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- the file ------------------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
                if self._regular:
                    _cut_torn_tail(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._whole = fd, True
        return self._fd

    def _append(self, payload: bytes) -> None:
        fd = self._open()
        if not self._whole:
            _cut_torn_tail(fd, self.path)
            self._whole = True
        start = os.fstat(fd).st_size if self._regular else 0
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            self._undo(fd, start)
            raise

    def _undo(self, fd: int, size: int) -> None:
        """Truncate a failed append back to ``size``; if even that fails, cut the tail next time."""
        if not self._regular:
            return
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            self._whole = False
            log.warning("Rows file %s: could not undo a partial write (%s); it is cut before the next", self.path, exc)


#: errno values that mean "the disk is unavailable for now" rather than "wrong path".
_OUTAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})
_TAIL_CHUNK = 64 * 1024


def _cut_torn_tail(fd: int, path: Path | None) -> None:
    """If the file does not end in a newline, truncate it back to its last one (WARNING)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    keep = 0
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    os.ftruncate(fd, keep)
    log.warning(
        "Rows file %s ended in a torn line (an interrupted write); cut its last %d bytes. That row's "
        "message was never settled, so it is written again when the message is redelivered",
        path,
        size - keep,
    )
