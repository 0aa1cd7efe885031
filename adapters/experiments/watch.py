"""Watching an experiments file: the registry the pump asks for, reloaded when the file changes.

A new file replaces the running one only when it is valid and a safe edit of it
(``docs/allocation.md`` §2.9: no experiment whose ``version`` is unchanged may move users it already
bucketed). Otherwise the last good configuration keeps running, and the problem is logged at ERROR
(the file, experiment and field named, or every refused experiment and why) and counted
(``ab.reload_failures``, by cause ``invalid`` or ``refused``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry import metrics

from adapters.experiments.file import load_registry, read_config_bytes
from worker.domain.allocation import changes
from worker.domain.errors import ConfigurationError
from worker.domain.registry import ExperimentRegistry

log = logging.getLogger(__name__)


def _fingerprint(path: Path) -> tuple[int, int, str] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    try:
        digest = hashlib.sha256(read_config_bytes(path)).hexdigest()
    except ConfigurationError as exc:
        # Unusable (too large, not a regular file): still a change, so the reload reports why.
        digest = f"unusable: {exc}"
    return (info.st_mtime_ns, info.st_size, digest)


#: Causes of a reload that was not applied (the ``cause`` attribute of ``ab.reload_failures``).
INVALID, REFUSED = "invalid", "refused"


class ReloadingRegistry:
    """Serves the registry from a file and picks up changes, checked at most every ``interval`` s.

    The pump calls :meth:`current` once per batch. An idle worker calls it rarely, so
    :meth:`watching` also checks the file every ``interval`` seconds from a thread, and a bad edit
    is reported when it is made, not when the next message arrives. A broken new file, or one whose
    edit the safe-edit rules refuse, keeps the last good registry running; ``on_error`` (and an
    ERROR log) reports it, :attr:`failed_reloads` (and :attr:`refused_reloads` for refused edits)
    and, once :meth:`count_in` gave it a meter, the ``ab.reload_failures`` metric count it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        interval: float = 2.0,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._clock = clock
        self._on_error = on_error
        self._registry = load_registry(self.path)
        self._seen = _fingerprint(self.path)
        self._checked_at = clock()
        self._lock = threading.Lock()
        self.reloads = 0
        #: Reloads not applied: broken files and refused edits.
        self.failed_reloads = 0
        #: Of those, the edits the safe-edit rules refused.
        self.refused_reloads = 0
        self._failures: metrics.Counter | None = None

    def count_in(self, meter_provider: metrics.MeterProvider | None) -> None:
        """Count reloads not applied in ``ab.reload_failures`` (by ``cause``) on this meter provider."""
        meter = metrics.get_meter("ab_assignment_worker", meter_provider=meter_provider)
        self._failures = meter.create_counter(
            "ab.reload_failures",
            description="Experiments-file reloads not applied (the last good file keeps running), by cause",
        )

    def __call__(self) -> ExperimentRegistry:
        """The current registry: a ``ReloadingRegistry`` is what the pump asks for a registry with."""
        return self.current()

    def current(self) -> ExperimentRegistry:
        """The newest good registry, reloading first when the file has changed."""
        now = self._clock()
        if now - self._checked_at >= self.interval:
            self._checked_at = now
            self.refresh()
        return self._registry

    @contextmanager
    def watching(self) -> Iterator[ReloadingRegistry]:
        """Check the file every ``interval`` seconds from a daemon thread while the block runs."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(self.interval):
                self.current()

        thread = threading.Thread(target=watch, name="experiments-file-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def refresh(self) -> bool:
        """Reload now if the file changed; True when a new configuration was installed."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        seen = _fingerprint(self.path)
        if seen is None or seen == self._seen:
            return False
        self._seen = seen
        try:
            registry = load_registry(self.path)
        except Exception as exc:  # a bad edit must never stop a running worker, whatever it raises
            self._not_applied(
                INVALID, "Experiment configuration NOT reloaded; still running the last good one", str(exc)
            )
            return False
        # Only the rules decide a refusal; the 100,000-id estimate of how many users move is
        # validate-config --against's (sample 0 keeps a reload cheap).
        report = changes(self._registry.allocation, registry.allocation, at=datetime.now(UTC), sample=0)
        if report.refused:
            self.refused_reloads += 1
            self._not_applied(
                REFUSED,
                "Experiment configuration NOT reloaded: the edit would move users already in an experiment "
                "whose version is unchanged; still running the last good one",
                report.refusal_message(str(self.path)),
            )
            return False
        self._registry = registry
        self.reloads += 1
        log.info("Experiment configuration reloaded from %s: %d experiments", self.path, len(registry))
        return True

    def _not_applied(self, cause: str, headline: str, problems: str) -> None:
        self.failed_reloads += 1
        log.error("%s:\n%s", headline, problems)
        if self._failures is not None:
            self._failures.add(1, {"cause": cause})
        if self._on_error is not None:
            self._on_error(problems)
