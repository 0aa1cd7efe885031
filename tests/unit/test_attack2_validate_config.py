"""validate-config lists every problem of an experiment: its targeting's too, when its fields fail.

docs/allocation.md §2.10: a file is refused with every problem listed. An experiment whose fields
failed model validation (``coverage: lots``) had its targeting never compiled, so an invalid
condition in it surfaced only on the next run, after the field was fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.cli import main
from worker.domain.errors import ConfigurationError
from worker.domain.registry import ExperimentRegistry

FILE = """\
experiments:
  - id: a
    split: {control: 0.5, blue: 0.5}
    coverage: lots
    targeting: {age: {$foo: 1}, country: {$in: US}}
  - id: b
    split: {control: 0.5, blue: 0.5}
    targeting: {age: {$bar: 1}}
  - id: c
    split: {control: 0.5, blue: 0.5}
    targeting: just-text
"""


def test_validate_config_lists_the_targeting_problems_of_an_experiment_whose_fields_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Experiment a: its coverage and both of its targeting clauses, each on its own line, exit 2."""
    path = tmp_path / "experiments.yaml"
    path.write_text(FILE, encoding="utf-8")
    assert main(["validate-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: experiment 'a': field 'coverage': Input should be a valid number" in err
    assert f"{path}: experiment 'a': field 'targeting.age.$foo': unknown operator '$foo'" in err
    assert f"{path}: experiment 'a': field 'targeting.country.$in'" in err
    assert f"{path}: experiment 'b': field 'targeting.age.$bar': unknown operator '$bar'" in err
    assert "5 problems" in err


def test_a_targeting_that_fails_as_a_field_is_listed_once() -> None:
    """A targeting the model refuses itself (not an object) is one problem, not also a condition problem."""
    with pytest.raises(ConfigurationError) as caught:
        ExperimentRegistry.from_dict(
            {"experiments": [{"id": "c", "split": {"control": 0.5, "blue": 0.5}, "coverage": "x", "targeting": "t"}]}
        )
    lines = str(caught.value).splitlines()
    assert [line for line in lines if "targeting" in line] == [
        next(line for line in lines if "field 'targeting'" in line)
    ]
    assert len(lines) == 2, lines
