"""The GrowthBook comparison's harness decides what it claims: both sides the same experiment, none short-circuited."""

from __future__ import annotations

import builtins
import importlib.util
from typing import Any

import pytest

from bench import bench_growthbook
from worker.domain.registry import ExperimentRegistry


def test_our_side_is_the_full_featured_experiment() -> None:
    """The benchmarked experiment uses every step, and the run's users reach every reason."""
    registry = ExperimentRegistry.from_dict(bench_growthbook.FILE, "bench")
    experiment = registry.experiment("exp_full")
    assert [step.name for step in experiment.allocation.steps] == [
        "override", "targeting", "holdout", "layer", "coverage", "bucket",
    ]  # fmt: skip
    assert len(experiment.config.overrides) == 10
    assert len(experiment.config.targeting or {}) == 3
    ids = [*bench_growthbook.OVERRIDES, *(f"user-{i:06d}" for i in range(2000))]
    reasons = {registry.assign("exp_full", user, context=bench_growthbook.CONTEXT).reason for user in ids}
    assert reasons == {"override", "holdout", "layer", "coverage", "bucketed"}


@pytest.mark.skipif(importlib.util.find_spec("growthbook") is None, reason="the [bench] extra is not installed")
def test_growthbook_side_decides_the_same_shares() -> None:
    """Both GrowthBook variants put about 0.95 x 0.9 x 0.8 of users in the experiment, as ours does."""
    ids = [f"user-{i:06d}" for i in range(4000)]
    for holdout in ("filter", "parent"):
        _, share = bench_growthbook.growthbook_run(ids, holdout)
        assert share() == pytest.approx(0.684, abs=0.03)
    _, ours = bench_growthbook.ours(ids)
    assert ours() == pytest.approx(0.684, abs=0.03)


def test_without_growthbook_it_says_so_and_times_our_side(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """No growthbook installed: one clear message, our side measured, no comparison claimed."""
    real_import = builtins.__import__

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "growthbook":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    assert bench_growthbook.main(["--users", "200", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "growthbook is not installed: install the benchmark extra" in out
    assert "ExperimentRegistry.assign" in out
    assert "vs the faster GrowthBook variant" not in out
