"""``assign --input`` JSON lines: a number the worker refuses is a skipped row naming its line, never a crash.

A request holding ``NaN``, ``Infinity``, ``1e400`` or an integer over Python's 4,300-digit conversion
limit is dead-lettered ``InvalidJson`` by the worker. The file reader took the first three (a row
decided on a NaN or infinite attribute, the output written with ``NaN``/``Infinity``, which is not
JSON) and stopped the whole command with a bare ValueError on the fourth.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.cli import main
from worker.cli.common import ExitStatus


@pytest.fixture
def config(tmp_path: Path) -> str:
    """One experiment targeting on age."""
    path = tmp_path / "experiments.json"
    path.write_text(
        json.dumps({"experiments": [{"id": "e", "split": {"a": 0.5, "b": 0.5}, "targeting": {"age": {"$gte": 18}}}]})
    )
    return str(path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000])
def test_a_row_with_a_number_the_worker_refuses_is_skipped_naming_its_line(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], literal: str
) -> None:
    """Rows 1 and 3 are decided; row 2 is skipped as not JSON the worker accepts; exit PARTIAL."""
    source = tmp_path / "users.jsonl"
    source.write_text(
        '{"user_id": "U1", "context": {"age": 30}}\n'
        f'{{"user_id": "U2", "context": {{"age": {literal}}}}}\n'
        '{"user_id": "U3", "context": {"age": 40}}\n',
        encoding="utf-8",
    )
    status = main(["assign", "--experiment", "e", "--config", config, "--input", str(source)])
    out, err = capsys.readouterr()
    assert status == ExitStatus.PARTIAL, err
    assert [json.loads(line)["user_id"] for line in out.splitlines()] == ["U1", "U3"]
    assert f"{source}: line 2: " in err
    assert "Traceback" not in err
    assert literal[:20] not in out
