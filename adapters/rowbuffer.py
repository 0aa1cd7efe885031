"""The flush policy every record sink shares: rows wait until there are enough or the oldest is old enough."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from schemas.models import AssignmentRecord
from worker.domain.errors import ConfigurationError


class BufferedRows:
    """Rows waiting for the next flush, due by size (``max_rows``) or by age (``max_age`` seconds).

    A base for sinks: they inherit :meth:`add`, :meth:`due` and :attr:`buffered` (the ``RecordSink``
    port's buffering half) and take the rows with :meth:`_take` when they flush.
    """

    def __init__(self, max_rows: int, max_age: float, clock: Callable[[], float], what: str) -> None:
        if max_rows < 1 or max_age <= 0:
            raise ConfigurationError(f"{what} needs max_rows >= 1 and max_age > 0 (got {max_rows}, {max_age})")
        self.max_rows = max_rows
        self.max_age = max_age
        self._clock = clock
        self._buffer: list[AssignmentRecord] = []
        self._oldest: float | None = None

    def add(self, records: Sequence[AssignmentRecord]) -> None:
        """Buffer rows for the next flush."""
        if not records:
            return
        if not self._buffer:
            self._oldest = self._clock()
        self._buffer.extend(records)

    def due(self) -> bool:
        """True when ``max_rows`` rows are buffered or the oldest is ``max_age`` seconds old."""
        if not self._buffer:
            return False
        if len(self._buffer) >= self.max_rows:
            return True
        return self._oldest is not None and self._clock() - self._oldest >= self.max_age

    def due_in(self) -> float | None:
        """Seconds until :meth:`due` (0 when due now); None when nothing is buffered."""
        if not self._buffer or self._oldest is None:
            return None
        if len(self._buffer) >= self.max_rows:
            return 0.0
        return max(0.0, self.max_age - (self._clock() - self._oldest))

    @property
    def buffered(self) -> int:
        """Rows waiting for the next flush."""
        return len(self._buffer)

    def _take(self) -> list[AssignmentRecord]:
        """Every buffered row, leaving the buffer empty (a failed flush drops them: the pump keeps its own)."""
        rows, self._buffer, self._oldest = self._buffer, [], None
        return rows
