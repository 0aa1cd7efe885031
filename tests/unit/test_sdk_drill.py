"""``make sdk-drill``'s verdict per guard, from its contract tests' outcomes and the guards that tripped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters.kusto import internals as kusto_internals
from adapters.sdk_guards import GuardSet
from adapters.servicebus import internals as servicebus_internals
from tests.sdk_drill import BROKEN, FAILS_CLOSED, HOLDS, NOT_REACHED, UNTESTED, Outcome, table, verdict


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([Outcome()], HOLDS),
        ([Outcome(), Outcome()], HOLDS),
        ([Outcome(failed_in="call", tripped={"g"})], FAILS_CLOSED),
        ([Outcome(), Outcome(failed_in="teardown", tripped={"g"})], FAILS_CLOSED),
        # Passed, yet the guard tripped: it took its fallback, so it did not hold.
        ([Outcome(tripped={"g"})], FAILS_CLOSED),
        # Failed and the guard never noticed: it would have answered wrongly on that SDK.
        ([Outcome(failed_in="call")], BROKEN),
        ([Outcome(failed_in="teardown")], BROKEN),
        # The worst of its tests: one unaware failure is enough.
        ([Outcome(failed_in="call", tripped={"g"}), Outcome(failed_in="call")], BROKEN),
        ([Outcome(failed_in="setup"), Outcome(failed_in="call", tripped={"g"})], FAILS_CLOSED),
        # Stopped on another guard, or before the guard was reached at all.
        ([Outcome(failed_in="call", tripped={"other"})], NOT_REACHED),
        ([Outcome(failed_in="setup")], NOT_REACHED),
        ([], UNTESTED),
    ],
)
def test_a_guards_verdict(outcomes: list[Outcome], expected: str) -> None:
    """Holds only when every test passed untripped; broken only when a test failed with the guard unaware."""
    assert verdict("g", outcomes) == expected


def test_the_table_names_each_sdk_its_versions_and_each_guards_verdict() -> None:
    """One line per SDK with the installed and the verified version, one per guard; all must hold for success."""
    guards = GuardSet(("azure-servicebus", "no-such-distribution"), logging.getLogger("test"))
    guards.add("a", reaches="x._a", fallback="slower")
    guards.add("b", reaches="x._b", fallback="slower")
    report, all_hold = table([(guards, "7.15.0")], {"a": [Outcome()], "b": [Outcome(failed_in="call", tripped={"b"})]})
    lines = report.splitlines()
    assert lines[0].startswith("azure-servicebus 7.")
    assert lines[0].endswith("no-such-distribution not installed (verified: 7.15.0)")
    assert lines[1].split() == ["a", "holds"]
    assert lines[2].split() == ["b", "fails", "closed"]
    assert not all_hold
    assert table([(guards, "7.15.0")], {"a": [Outcome()], "b": [Outcome()]})[1]


def test_the_verified_versions_are_the_pinned_ones_and_the_docs_say_so() -> None:
    """Moving a pin means running the drill: the lock, each internals module and the architecture page agree."""
    lines = Path("requirements.lock").read_text(encoding="utf-8").splitlines()
    lock = dict(line.split("==", 1) for line in lines if "==" in line)
    assert lock["azure-servicebus"] == servicebus_internals.VERIFIED_VERSION
    assert lock["azure-kusto-data"] == lock["azure-kusto-ingest"] == kusto_internals.VERIFIED_VERSION
    page = Path("docs/architecture.md").read_text(encoding="utf-8")
    row = f"| pinned, verified | {servicebus_internals.VERIFIED_VERSION} | {kusto_internals.VERIFIED_VERSION} |"
    assert row in page
