"""Guards around an SDK's private surface: each fails closed, says so once, and can be asked what tripped.

Each SDK whose internals the adapters use has one module that touches them
(:mod:`adapters.servicebus.internals`, :mod:`adapters.kusto.internals`) and one :class:`GuardSet`
there, naming every use as a :class:`Guard`: what it reaches and what the worker does instead when
an SDK release moved it. A guard that meets an SDK it does not recognise *trips*: one WARNING per
guard per process, naming the guard, the SDK version and the fallback, and then the fallback, which
is always correct (slower, or with one bound fewer), never a guess at the expected answer.
``make sdk-drill`` reads which guards tripped to tell, per guard, whether a newer SDK still holds.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Guard:
    """One use of an SDK's private surface."""

    #: Short name, as the WARNING and ``make sdk-drill`` print it.
    name: str
    #: The private attributes or modules it reaches.
    reaches: str
    #: What the worker does when they are not there.
    fallback: str


class SdkSurfaceMissing(Exception):
    """A guard tripped: the SDK's private surface is not what it expects; the caller takes its fallback."""

    def __init__(self, guard: Guard, detail: str) -> None:
        super().__init__(f"{guard.name} unavailable: the SDK's internals are not as expected ({detail})")
        self.guard = guard


class GuardSet:
    """The guards of one SDK (one or more distributions released together) and which of them tripped."""

    def __init__(self, distributions: tuple[str, ...], logger: logging.Logger) -> None:
        self.distributions = distributions
        self.guards: dict[str, Guard] = {}
        self._log = logger
        self._tripped: set[str] = set()
        self._lock = threading.Lock()

    def add(self, name: str, *, reaches: str, fallback: str) -> Guard:
        """Declare a guard (at import of the internals module)."""
        guard = Guard(name, reaches, fallback)
        self.guards[name] = guard
        return guard

    def trip(self, guard: Guard, cause: BaseException | str) -> SdkSurfaceMissing:
        """Record that ``guard`` met an SDK it does not know (WARNING the first time); returns the error to raise."""
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        with self._lock:
            first = guard.name not in self._tripped
            self._tripped.add(guard.name)
        if first:
            self._log.warning(
                "%s internals not as expected, %s is off (%s): %s",
                self.describe_versions(),
                guard.name,
                detail,
                guard.fallback,
            )
        return SdkSurfaceMissing(guard, detail)

    @property
    def tripped(self) -> frozenset[str]:
        """The names of the guards that tripped in this process."""
        with self._lock:
            return frozenset(self._tripped)

    def reset(self) -> None:
        """Forget what tripped (tests: each one sees its own WARNING)."""
        with self._lock:
            self._tripped.clear()

    def versions(self) -> dict[str, str]:
        """The installed version of each distribution (``"not installed"`` when it is not)."""
        found = {}
        for name in self.distributions:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                found[name] = "not installed"
        return found

    def describe_versions(self) -> str:
        """``azure-servicebus 7.15.0``, as the WARNING says it."""
        return ", ".join(f"{name} {version}" for name, version in self.versions().items())
