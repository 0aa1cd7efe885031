"""The suite's start order (tests/conftest.py): recorded durations first, longest first, then the
integration-first rule; ``--record-durations`` keeps the file those durations come from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DURATIONS, RECORD_AT_LEAST, DurationRecorder, recorded_durations, start_order


class Item:
    """What the ordering reads of a collected test: its id and whether it is marked integration."""

    def __init__(self, nodeid: str, integration: bool = False) -> None:
        self.nodeid = nodeid
        self.integration = integration

    def get_closest_marker(self, name: str) -> Any:
        return object() if name == "integration" and self.integration else None


def ordered(items: list[Item], recorded: dict[str, float]) -> list[str]:
    return [i.nodeid for i in sorted(items, key=lambda item: start_order(item, recorded))]  # type: ignore[arg-type]


def report(nodeid: str, duration: float) -> Any:
    return type("Report", (), {"nodeid": nodeid, "duration": duration})()


def test_recorded_tests_start_first_longest_first_then_integration_then_the_rest() -> None:
    """Known durations decide among themselves; unknown tests keep the integration-first rule, in file order."""
    items = [
        Item("unit::a"),
        Item("integration::b", integration=True),
        Item("unit::slow"),
        Item("integration::c", integration=True),
        Item("integration::slower", integration=True),
    ]
    recorded = {"unit::slow": 12.0, "integration::slower": 30.5, "gone::test": 99.0}
    expected = ["integration::slower", "unit::slow", "integration::b", "integration::c", "unit::a"]
    assert ordered(items, recorded) == expected


def test_a_new_long_test_starts_early_after_one_recorded_run(tmp_path: Path) -> None:
    """Unknown, a long unit test starts last; once a run recorded it, it starts first. Short ones stay out."""
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"integration::old": 20.0, "unit::got_fast": 8.0}), encoding="utf-8")
    items = [Item("integration::old", integration=True), Item("unit::fast"), Item("unit::new_and_long")]
    assert ordered(items, recorded_durations(path))[-1] == "unit::new_and_long"

    recorder = DurationRecorder(path)
    for nodeid, phases in {
        "unit::new_and_long": (0.5, 40.0, 0.25),
        "unit::fast": (0.01, 0.2, 0.01),
        "unit::got_fast": (0.01, RECORD_AT_LEAST / 2, 0.01),
    }.items():
        for duration in phases:
            recorder.pytest_runtest_logreport(report(nodeid, duration))
    recorder.pytest_sessionfinish(session=None)  # type: ignore[arg-type]

    durations = recorded_durations(path)
    assert durations == {"unit::new_and_long": 40.8, "integration::old": 20.0}  # merged; the fast one dropped
    assert list(durations) == ["unit::new_and_long", "integration::old"]  # the file reads longest first
    assert ordered(items, durations)[0] == "unit::new_and_long"


def test_the_committed_file_holds_this_suite_longest_first() -> None:
    """tests/durations.json exists, is longest first, and names tests of this repository."""
    durations = recorded_durations(DURATIONS)
    assert durations, f"{DURATIONS} is missing or empty: run `make durations`"
    seconds = list(durations.values())
    assert seconds == sorted(seconds, reverse=True)
    assert all(value >= RECORD_AT_LEAST for value in seconds)
    root = DURATIONS.parents[1]
    missing = {node.split("::")[0] for node in durations if not (root / node.split("::")[0]).exists()}
    assert not missing, f"durations for files that no longer exist (run `make durations`): {sorted(missing)}"


def test_only_the_controlling_process_records(pytestconfig: pytest.Config) -> None:
    """A recorder is registered when --record-durations is given, and never in an xdist worker process."""
    recording = pytestconfig.getoption("--record-durations") and not hasattr(pytestconfig, "workerinput")
    assert (pytestconfig.pluginmanager.get_plugin("duration-recorder") is not None) == recording
