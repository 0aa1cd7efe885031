"""``ab-worker validate-config``: every problem of a file in one run, and ``--against OLD`` for safe edits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from worker.cli import main
from worker.cli.common import ExitStatus

EVERY_PROBLEM = """
layers:
  - {id: checkout}
  - {id: search, colour: blue}
holdouts:
  - {id: q1, share: 0.05}
experiments:
  - {id: a, split: {A: 0.5, B: 0.5}, colour: red}
  - {id: b, split: {A: 0.7, B: 0.7}}
  - {id: c, split: {A: 1.0}}
  - {id: c, split: {A: 1.0}}
  - {id: d, split: {A: 0.5, B: 0.5}, layer: {id: checkout, range: [0.0, 0.6]}}
  - {id: e, split: {A: 0.5, B: 0.5}, layer: {id: checkout, range: [0.5, 1.0]}, holdouts: [q2]}
  - {id: f, split: {A: 0.5, B: 0.5}, control: Z, status: stopped, launched: A}
  - {id: g, split: {A: 0.5, B: 0.5}, targeting: {email: {$regex: ".*"}, app: {$vgt: "5.02"}}}
  - {id: h, split: {A: 0.5, B: 0.5}, layer: {id: search, range: [0.0, 0.5]}}
"""


def _file(tmp_path: Path, text: str, name: str = "experiments.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_problem_of_a_file_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Field errors (experiments and layers), duplicate ids, split sums and whole-file allocation problems together."""
    path = _file(tmp_path, EVERY_PROBLEM)
    assert main(["validate-config", str(path)]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    lines = err.splitlines()
    expected = [
        "experiment 'a': field 'colour': unknown key",
        "layer 'search': field 'colour': unknown key",
        "experiment 'b': field 'split'",
        "experiment 'c': duplicate id",
        "experiment 'e': field 'layer.range': [0.5, 1.0) overlaps [0.0, 0.6) of experiment 'd'",
        "experiment 'e': field 'holdouts.0': unknown holdout 'q2'",
        "experiment 'f': field 'control': 'Z' is not a variant",
        "experiment 'f': field 'launched': set only with status launched",
        "experiment 'g': field 'targeting.email.$regex'",
        "experiment 'g': field 'targeting.app.$vgt'",
    ]
    for fragment in expected:
        assert any(fragment in line for line in lines), (fragment, err)
    assert lines[0] == f"ab-worker validate-config: error: {len(lines) - 1} problems:"
    assert len(lines) - 1 == len(expected), err
    assert not any("'h'" in line for line in lines), "a layer with a bad field still stands for its id"
    assert "Traceback" not in err


def test_a_valid_file_lists_each_experiment_with_its_allocation(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo file: every experiment on one line, the features it uses and its config_version."""
    demo = str(Path(__file__).parents[2] / "deploy" / "experiments.yaml")
    assert main(["validate-config", demo]) == ExitStatus.OK
    out = capsys.readouterr().out
    assert "ok  exp_001 v1 seed='echovoice' split A=0.5, B=0.5  [config " in out
    assert out.rstrip().endswith("all valid")


OLD = """
holdouts:
  - {id: q1, share: 0.05}
experiments:
  - {id: same, split: {A: 0.5, B: 0.5}}
  - {id: cta, split: {control: 0.5, blue: 0.5}, coverage: 0.3}
  - {id: gone, split: {A: 1.0}}
"""


def _coverage_share(low: float, high: float) -> str:
    """Share of the synthetic ids whose coverage hash (docs/allocation.md §2.1) is in [low, high), as printed."""
    inside = 0
    for index in range(100_000):
        key = f"coverage:echovoice:cta:synthetic-{index:06d}".encode()
        value = int(hashlib.md5(key).hexdigest()[:8], 16) % 1_000_000 / 1_000_000
        inside += low <= value < high
    return f"{inside / 100_000:.2%}"


def test_against_a_safe_edit_prints_what_changed_and_who_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ramping coverage up: no refusal, exit 0, and the share of users newly exposed."""
    old = _file(tmp_path, OLD, "old.yaml")
    new = _file(
        tmp_path, OLD.replace("coverage: 0.3", "coverage: 0.5").replace("  - {id: gone", "  - {id: new"), "new.yaml"
    )
    assert main(["validate-config", str(new), "--against", str(old)]) == ExitStatus.OK
    out = capsys.readouterr().out
    assert "unchanged  same" in out
    assert "changed    cta\n           coverage: 0.3 → 0.5\n" in out
    assert f"users whose variant or exposure would change: {_coverage_share(0.3, 0.5)}" in out
    assert "removed    gone" in out
    assert "added      new" in out
    assert "REFUSED" not in out
    assert out.rstrip().endswith("a running worker would reload it")


def test_against_a_refused_edit_exits_2_naming_every_refused_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lowering coverage and adding a holdout without a new version: exit 2, each reason on its own line."""
    old = _file(tmp_path, OLD, "old.yaml")
    edited = OLD.replace("coverage: 0.3}", "coverage: 0.1, holdouts: [q1]}").replace(
        "{id: same, split: {A: 0.5, B: 0.5}}", "{id: same, split: {A: 0.4, B: 0.6}}"
    )
    new = _file(tmp_path, edited, "new.yaml")
    assert main(["validate-config", str(new), "--against", str(old)]) == ExitStatus.USAGE
    captured = capsys.readouterr()
    assert "REFUSED: coverage lowered from 0.3 to 0.1" in captured.out
    assert "REFUSED: holdout 'q1' newly listed" in captured.out
    assert "REFUSED: split changed" in captured.out
    assert "would refuse this reload" in captured.out
    errors = captured.err.splitlines()
    assert errors[0] == "ab-worker validate-config: error: 3 problems:"
    assert f"{new}: experiment 'cta': coverage lowered from 0.3 to 0.1; change its version to apply this edit" in (
        captured.err
    )
    assert f"{new}: experiment 'same': split changed" in captured.err
    bumped = _file(
        tmp_path,
        edited.replace("{id: same,", "{id: same, version: '2',").replace("{id: cta,", "{id: cta, version: '2',"),
        "v2.yaml",
    )
    assert main(["validate-config", str(bumped), "--against", str(old)]) == ExitStatus.OK


def test_against_a_broken_old_file_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The file running now must be valid too; its problems name it."""
    old = _file(tmp_path, "experiments:\n  - {id: x, split: {A: 0.5}}\n", "old.yaml")
    new = _file(tmp_path, OLD, "new.yaml")
    assert main(["validate-config", str(new), "--against", str(old)]) == ExitStatus.USAGE
    assert f"{old}: experiment 'x': field 'split'" in capsys.readouterr().err


def test_against_at_a_time_estimates_then(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An experiment not started yet moves nobody now; --at its start shows who its split change moves."""
    old = _file(
        tmp_path, "experiments:\n  - {id: s, split: {A: 0.5, B: 0.5}, start_at: '2999-01-01T00:00:00Z'}\n", "o.yaml"
    )
    new = _file(tmp_path, old.read_text().replace("A: 0.5, B: 0.5", "A: 0.2, B: 0.8"), "n.yaml")
    assert main(["validate-config", str(new), "--against", str(old)]) == ExitStatus.USAGE
    assert "would change: 0.00%" in capsys.readouterr().out
    assert (
        main(["validate-config", str(new), "--against", str(old), "--at", "2999-06-01T00:00:00Z"]) == ExitStatus.USAGE
    )
    out = capsys.readouterr().out
    assert "decided at 2999-06-01T00:00:00Z" in out
    assert "would change: 0.00%" not in out
