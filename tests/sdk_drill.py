"""``make sdk-drill``: run the SDK internals contract tests against the installed SDKs and say which guards hold.

Run by ``make sdk-drill`` in a scratch virtual environment (``.venv-sdk-drill``) that has the
project's lock with the newest azure-servicebus, azure-kusto-data and azure-kusto-ingest on top, so
moving the pins is a measured decision. Each guard of :mod:`adapters.servicebus.internals` and
:mod:`adapters.kusto.internals` is pinned to the real SDK by the contract tests that name it (the
``sdk_guard`` marker); from their outcomes and from which guards tripped while they ran, each guard:

* **holds**: its tests pass and it never tripped: the private surface is there and does its job;
* **fails closed**: a test failed and the guard had tripped: it noticed, said so (one WARNING) and
  took its fallback; the worker is correct on that SDK, without what the guard gave;
* **broken**: a test failed and the guard had not tripped: it did not notice that the SDK changed
  under it; moving the pin needs that guard fixed first;
* **not reached**: its test could not get that far on this SDK: its set-up failed (the embedded
  broker and the SDK do not talk), or another guard tripped first.

Exit status 0 when every guard holds, 1 otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adapters.kusto import internals as kusto_internals
from adapters.sdk_guards import GuardSet
from adapters.servicebus import internals as servicebus_internals

#: The contract tests, one per guard (each names its guard with ``@pytest.mark.sdk_guard``).
CONTRACT_TESTS = ("tests/integration/test_sdk_contract.py", "tests/integration/test_kusto_sdk_contract.py")

#: Each SDK's guards, and the version its internals module was verified against.
SDKS = (
    (servicebus_internals.GUARDS, servicebus_internals.VERIFIED_VERSION),
    (kusto_internals.GUARDS, kusto_internals.VERIFIED_VERSION),
)

HOLDS, FAILS_CLOSED, BROKEN, NOT_REACHED, UNTESTED = "holds", "fails closed", "broken", "not reached", "no test"


@dataclass
class Outcome:
    """One contract test: the first phase that failed (None: all passed), and the guards tripped while it ran."""

    failed_in: str | None = None
    tripped: set[str] = field(default_factory=set)


def verdict(guard: str, outcomes: Sequence[Outcome]) -> str:
    """One guard's state from the outcomes of the tests that pin it."""
    states = [_state(guard, outcome) for outcome in outcomes]
    return max(states, key=_SEVERITY.index) if states else UNTESTED


#: From best to worst: a guard's verdict is the worst of its tests'.
_SEVERITY = (HOLDS, NOT_REACHED, FAILS_CLOSED, BROKEN)


def _state(guard: str, outcome: Outcome) -> str:
    if guard in outcome.tripped:
        return FAILS_CLOSED
    if outcome.failed_in is None:
        return HOLDS
    if outcome.failed_in != "setup" and not outcome.tripped:
        return BROKEN
    return NOT_REACHED


class Recorder:
    """A pytest plugin: each ``sdk_guard`` test's outcome, and the guards tripped by the end of its call."""

    def __init__(self, guard_sets: Iterable[GuardSet]) -> None:
        self.guard_sets = list(guard_sets)
        self.outcomes: dict[str, list[Outcome]] = {}
        self._current: dict[str, Outcome] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
        """Record after each phase; the tripped guards at the end of the call (the teardown forgets them)."""
        report = (yield).get_result()  # type: ignore[attr-defined]
        marker = item.get_closest_marker("sdk_guard")
        if marker is None:
            return
        outcome = self._current.setdefault(item.nodeid, Outcome())
        if report.failed and outcome.failed_in is None:
            outcome.failed_in = call.when
        if call.when == "call":
            outcome.tripped = {name for guard_set in self.guard_sets for name in guard_set.tripped}
        if call.when == "teardown":
            for guard in marker.args:
                self.outcomes.setdefault(guard, []).append(self._current.pop(item.nodeid))


def table(guard_sets: Sequence[tuple[GuardSet, str]], outcomes: dict[str, list[Outcome]]) -> tuple[str, bool]:
    """The drill's report, and whether every guard holds."""
    lines = []
    all_hold = True
    for guard_set, verified in guard_sets:
        versions = ", ".join(f"{name} {version}" for name, version in guard_set.versions().items())
        lines.append(f"{versions} (verified: {verified})")
        for name in guard_set.guards:
            state = verdict(name, outcomes.get(name, []))
            all_hold = all_hold and state == HOLDS
            lines.append(f"  {name:<40} {state}")
    return "\n".join(lines), all_hold


def main(argv: Sequence[str] = ()) -> int:
    """Run the contract tests in this process (extra pytest arguments in ``argv``), print the table."""
    recorder = Recorder(guard_set for guard_set, _ in SDKS)
    root = Path(__file__).resolve().parent.parent
    pytest.main(
        [*(str(root / path) for path in CONTRACT_TESTS), "-p", "no:cacheprovider", "-q", *argv], plugins=[recorder]
    )
    report, all_hold = table(SDKS, recorder.outcomes)
    print(f"\nSDK internals drill\n{report}\n(what each verdict means: tests/sdk_drill.py, docs/architecture.md)")
    return 0 if all_hold else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
