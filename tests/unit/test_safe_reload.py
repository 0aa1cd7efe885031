"""Safe hot reload: an edit the safe-edit rules refuse keeps the last good registry, logged and counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from adapters.experiments import ReloadingRegistry
from adapters.memory import MemoryPublisher, MemorySink, MemorySource
from worker.bootstrap import bootstrap
from worker.service.pump import PumpConfig

GOOD: dict[str, Any] = {
    "holdouts": [{"id": "h", "share": 0.05}],
    "experiments": [
        {"id": "cta", "version": "1", "split": {"control": 0.5, "blue": 0.5}, "coverage": 0.2},
        {"id": "copy", "version": "4", "split": {"control": 0.5, "short": 0.5}, "holdouts": ["h"]},
    ],
}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document), encoding="utf-8")


def _edited(**changes: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(json.dumps(GOOD))
    for experiment in document["experiments"]:
        experiment.update(changes.get(experiment["id"], {}))
    return document


def _failures(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    counts: dict[str, int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "ab.reload_failures":
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        assert point.attributes is not None
                        counts[str(point.attributes["cause"])] = int(point.value)
    return counts


@pytest.fixture
def watched(tmp_path: Path) -> tuple[Path, ReloadingRegistry, _Clock, list[str], InMemoryMetricReader]:
    path = tmp_path / "experiments.json"
    _write(path, GOOD)
    clock, errors = _Clock(), list[str]()
    registry = ReloadingRegistry(path, interval=1, on_error=errors.append, clock=clock)
    reader = InMemoryMetricReader()
    registry.count_in(MeterProvider(metric_readers=[reader]))
    return path, registry, clock, errors, reader


def _reload(path: Path, registry: ReloadingRegistry, clock: _Clock, document: dict[str, Any]) -> None:
    _write(path, document)
    clock.now += 2
    registry.current()


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ({"cta": {"split": {"control": 0.4, "blue": 0.6}}}, "split changed"),
        ({"cta": {"coverage": 0.1}}, "coverage lowered from 0.2 to 0.1"),
        ({"cta": {"targeting": {"country": "US"}}}, "targeting added"),
        ({"cta": {"holdouts": ["h"]}}, "holdout 'h' newly listed"),
        ({"copy": {"seed": "other"}}, "seed changed"),
        ({"copy": {"control": "short"}}, "control changed"),
    ],
)
def test_a_refused_edit_keeps_the_last_good_registry_logged_and_counted(
    watched: Any, caplog: pytest.LogCaptureFixture, edit: dict[str, Any], why: str
) -> None:
    """An edit that would move bucketed users of an experiment whose version is unchanged is not applied."""
    path, registry, clock, errors, reader = watched
    before = registry.current()
    with caplog.at_level(logging.ERROR):
        _reload(path, registry, clock, _edited(**edit))
    assert registry.current() is before
    assert (registry.failed_reloads, registry.refused_reloads, registry.reloads) == (1, 1, 0)
    (experiment,) = edit
    assert f"experiment {experiment!r}: {why}; change its version to apply this edit" in errors[0]
    assert str(path) in errors[0]
    assert "NOT reloaded" in caplog.text
    assert why in caplog.text
    assert _failures(reader) == {"refused": 1}


def test_the_same_edit_with_a_new_version_is_applied(watched: Any) -> None:
    """A new version starts a fresh analysis: the edit goes through."""
    path, registry, clock, errors, _ = watched
    _reload(path, registry, clock, _edited(cta={"split": {"control": 0.4, "blue": 0.6}, "version": "2"}))
    assert registry.current().get("cta").config.split == {"control": 0.4, "blue": 0.6}
    assert (registry.reloads, registry.failed_reloads, errors) == (1, 0, [])


@pytest.mark.parametrize(
    "edit",
    [
        {"cta": {"coverage": 0.5}},
        {"cta": {"status": "stopped"}},
        {"cta": {"overrides": {"qa": "blue"}}},
        {"copy": {"holdouts": []}},
        {"cta": {"description": "ramped"}},
    ],
)
def test_safe_edits_are_applied(watched: Any, edit: dict[str, Any]) -> None:
    """Ramping up, stopping, overrides, dropping a holdout, a description: no new version needed."""
    path, registry, clock, errors, reader = watched
    _reload(path, registry, clock, _edited(**edit))
    assert registry.reloads == 1
    assert errors == []
    assert _failures(reader) == {}


def test_one_refusal_refuses_the_whole_file_and_names_every_refused_experiment(watched: Any) -> None:
    """A reload is all or nothing: the safe part waits with the refused one, and every refusal is named."""
    path, registry, clock, errors, _ = watched
    edit = _edited(cta={"coverage": 0.9, "seed": "new"}, copy={"split": {"control": 0.9, "short": 0.1}})
    _reload(path, registry, clock, edit)
    assert registry.current().get("cta").config.coverage == 0.2
    lines = errors[0].splitlines()
    assert any("'cta': seed changed" in line for line in lines)
    assert any("'copy': split changed" in line for line in lines)


def test_a_broken_edit_is_counted_as_invalid(watched: Any) -> None:
    """A file that does not validate is counted too, with cause invalid."""
    path, registry, clock, errors, reader = watched
    _reload(path, registry, clock, _edited(cta={"control": "nope"}))
    assert registry.failed_reloads == 1
    assert registry.refused_reloads == 0
    assert "field 'control'" in errors[0]
    assert _failures(reader) == {"invalid": 1}


def test_a_running_pump_keeps_deciding_by_the_last_good_file(tmp_path: Path) -> None:
    """Through bootstrap: after a refused edit the pump's requests are decided by the old configuration,
    and the refusal reaches the pump's meter provider."""
    path = tmp_path / "experiments.json"
    _write(path, GOOD)
    clock = _Clock()
    registry = ReloadingRegistry(path, interval=1, clock=clock)
    reader = InMemoryMetricReader()
    source, publisher = MemorySource(), MemoryPublisher()
    pump = bootstrap(
        source=source,
        publisher=publisher,
        sink=MemorySink(),
        registry=registry,
        config=PumpConfig(),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    _reload(path, registry, clock, _edited(cta={"coverage": 0.0}))
    for index in range(50):
        source.send(json.dumps({"user_id": f"U{index}", "experiment_id": "cta"}))
    pump.run(idle_exit=0)
    reasons = {json.loads(event.body)["reason"] for event in publisher.published}
    assert reasons == {"coverage", "bucketed"}, "coverage 0 would have served every user control"
    assert _failures(reader) == {"refused": 1}
