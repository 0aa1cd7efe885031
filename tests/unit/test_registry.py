"""The experiment registry: validation with precise errors, and hot reload that keeps the last good file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters.experiments import ReloadingRegistry
from worker import ExperimentRegistry
from worker.domain.errors import ConfigurationError

REPO = Path(__file__).parents[2]
GOOD = """
experiments:
  - id: exp_a
    version: "2"
    split: {A: 0.5, B: 0.5}
    variants: {A: {tone: urgent}}
    segments:
      vip: {A: 0.2, B: 0.8}
"""


def _write(tmp_path: Path, text: str, name: str = "experiments.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_example_is_valid():
    """deploy/experiments.yaml loads."""
    registry = ExperimentRegistry.load(REPO / "deploy" / "experiments.yaml")
    assert "exp_001" in registry


def test_load_compiles_splits_and_segments(tmp_path):
    """Segments get their own split; defaults fill seed and version."""
    registry = ExperimentRegistry.load(_write(tmp_path, GOOD))
    experiment = registry.get("exp_a")
    assert experiment is not None
    assert experiment.config.seed == "echovoice"
    assert experiment.table_for("vip").thresholds["A"] == (0.0, 0.2)
    assert experiment.table_for("other").thresholds["A"] == (0.0, 0.5)
    assert experiment.metadata_for("A") == {"tone": "urgent"}
    assert experiment.metadata_for("B") == {}


def test_json_files_are_accepted(tmp_path):
    """A .json registry works the same."""
    path = _write(tmp_path, '{"experiments": [{"id": "j", "split": {"A": 1.0}}]}', "e.json")
    assert "j" in ExperimentRegistry.load(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("experiments:\n  - id: e1\n    splt: {A: 1.0}\n", ["experiment 'e1'", "'splt'", "unknown key"]),
        ("experiments:\n  - id: e1\n    split: {A: 0.6, B: 0.3}\n", ["experiment 'e1'", "'split'", "must sum to 1.0"]),
        ("experiments:\n  - id: e1\n    split: {A: -1, B: 2}\n", ["experiment 'e1'", "split.A"]),
        (
            "experiments:\n  - id: e1\n    split: {A: 1.0}\n    segments: {vip: {A: 0.5, Z: 0.5}}\n",
            ["segments.vip", "not in the experiment's split", "'Z'"],
        ),
        (
            "experiments:\n  - id: e1\n    split: {A: 1.0}\n    variants: {Q: {}}\n",
            ["'variants'", "'Q'"],
        ),
        ("experiments:\n  - id: e1\n    split: {A: 1.0}\n  - id: e1\n    split: {A: 1.0}\n", ["duplicate id"]),
        ("experiments:\n  - split: {A: 1.0}\n", ["experiment #1", "'id'", "Field required"]),
        ("experiments: [\n", ["invalid YAML", "line"]),
        ("version: 1\n", ["'experiments'"]),
    ],
)
def test_errors_name_file_experiment_and_field(tmp_path, text, expected):
    """Every problem names the file, the experiment and the field."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigurationError) as info:
        ExperimentRegistry.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_missing_file(tmp_path):
    """A missing file is a clear error, not a traceback."""
    with pytest.raises(ConfigurationError, match="file not found"):
        ExperimentRegistry.load(tmp_path / "nope.yaml")


def test_not_utf8(tmp_path):
    """Binary junk is reported as not UTF-8."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        ExperimentRegistry.load(path)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reload_picks_up_changes(tmp_path):
    """A changed file is loaded at the next check after the interval."""
    path = _write(tmp_path, GOOD)
    clock = _Clock()
    registry = ReloadingRegistry(path, interval=5, clock=clock)
    assert "exp_b" not in registry.current()
    path.write_text(GOOD + "  - id: exp_b\n    split: {A: 1.0}\n", encoding="utf-8")
    clock.now = 1
    assert "exp_b" not in registry.current(), "checked before the interval passed"
    clock.now = 6
    assert "exp_b" in registry.current()
    assert registry.reloads == 1


def test_broken_reload_keeps_last_good_and_reports(tmp_path, caplog):
    """A broken edit keeps the last good configuration running and is reported at ERROR."""
    path = _write(tmp_path, GOOD)
    reported: list[str] = []
    clock = _Clock()
    registry = ReloadingRegistry(path, interval=1, on_error=reported.append, clock=clock)
    path.write_text("experiments:\n  - id: exp_a\n    split: {A: 0.7}\n", encoding="utf-8")
    clock.now = 2
    with caplog.at_level(logging.ERROR):
        current = registry.current()
    assert current.experiment("exp_a").config.version == "2"
    assert registry.failed_reloads == 1
    assert "must sum to 1.0" in reported[0]
    assert "NOT reloaded" in caplog.text
    path.write_text(GOOD.replace('"2"', '"3"'), encoding="utf-8")
    clock.now = 4
    assert registry.current().experiment("exp_a").config.version == "3"


def test_public_load_reads_through_the_adapter_into_the_domain_model(tmp_path):
    """``worker.ExperimentRegistry.load(path)`` returns the class it was called on, a domain registry."""
    import worker
    from worker.domain import registry as model

    registry = worker.ExperimentRegistry.load(_write(tmp_path, GOOD))
    assert isinstance(registry, worker.ExperimentRegistry)
    assert isinstance(registry, model.ExperimentRegistry)
    assert registry.experiment("exp_a").table_for("vip").thresholds["A"] == (0.0, 0.2)
    assert not hasattr(model.ExperimentRegistry, "load"), "the domain model reads no file"


def test_a_reloading_registry_is_an_experiment_source(tmp_path):
    """The file adapter serves the pump's port: calling it gives the current registry."""
    from worker.service.ports import ExperimentSource

    source: ExperimentSource = ReloadingRegistry(_write(tmp_path, GOOD), interval=60)
    assert "exp_a" in source()
