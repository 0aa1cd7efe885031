"""The --rows sink (adapters.files.JsonLinesSink): whole lines, outages held, flushed by age."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters.files import JsonLinesSink
from schemas.models import AssignmentRecord
from worker.domain.errors import ConfigurationError, TransientError

ROOT = Path(__file__).resolve().parents[2]


def record(i: int) -> AssignmentRecord:
    """A small but complete row."""
    return AssignmentRecord(
        EventId=f"event-{i}",
        AssignedAt=datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
        ExperimentId="exp",
        ExperimentVersion="1",
        UserId=f"U{i}",
        VariantId="A",
        HashValue=0.5,
        Segment="",
        Strategy="md5_hash",
        Seed="echovoice",
        SplitRatio={"A": 0.5, "B": 0.5},
        VariantMetadata={},
        Context={},
        RequestId=f"req-{i}",
        CorrelationId=f"corr-{i}",
        SchemaVersion="1.0",
        ExperimentArm="",
        CohortId="",
        InExperiment=True,
        Reason="bucketed",
        ConfigVersion="5e1f0c2d9a8b7c6d",
    )


def rows_in(path: Path) -> list[str]:
    """EventIds of the file's lines; fails on any line that is not a whole JSON object."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last line: {data[-80:]!r}"
    return [json.loads(line)["EventId"] for line in data.splitlines()]


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("to_file", [True, False], ids=["rows-file", "count-only"])
def test_due_by_age_of_the_oldest_row_as_well_as_by_size(tmp_path: Path, to_file: bool) -> None:
    """A trickle is flushed by age: due() turns true max_age after the oldest row, files or not."""
    clock = Clock()
    sink = JsonLinesSink(tmp_path / "rows.jsonl" if to_file else None, max_rows=100, max_age=2.0, clock=clock)
    assert not sink.due()
    sink.add([record(1)])
    clock.now += 1.9
    sink.add([record(2)])
    assert not sink.due()
    clock.now += 0.1
    assert sink.due()
    sink.flush()
    assert not sink.due()
    assert sink.rows_written == 2
    sink.add([record(i) for i in range(100)])
    assert sink.due()  # by size, no time passed
    sink.close()


def test_a_torn_tail_is_cut_on_open_so_no_row_is_glued_onto_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash mid-write left half a line: it is cut (WARNING) and the next row starts on its own line."""
    path = tmp_path / "rows.jsonl"
    whole = record(1).model_dump_json() + "\n" + record(2).model_dump_json() + "\n"
    path.write_text(whole + '{"Eve', encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="adapters.files"):
        sink = JsonLinesSink(path)
    assert path.read_text(encoding="utf-8") == whole
    assert any("torn line" in r.getMessage() and "5 bytes" in r.getMessage() for r in caplog.records)
    sink.add([record(3)])
    sink.close()
    assert rows_in(path) == ["event-1", "event-2", "event-3"]


def test_a_file_that_is_one_torn_line_is_emptied(tmp_path: Path) -> None:
    """No newline at all: the whole fragment goes."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"EventId": "half')
    JsonLinesSink(path).close()
    assert path.read_bytes() == b""


def test_an_unusable_path_is_a_clear_configuration_error(tmp_path: Path) -> None:
    """A missing directory is a mistake, not an outage: refused at start with the file named."""
    missing = tmp_path / "no-such-dir" / "rows.jsonl"
    with pytest.raises(ConfigurationError, match=r"no-such-dir/rows\.jsonl: cannot open the rows file"):
        JsonLinesSink(missing)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_no_space_left_is_a_transient_error_naming_the_file() -> None:
    """/dev/full answers every write with ENOSPC: flush raises TransientError (the pump holds), no traceback."""
    sink = JsonLinesSink(Path("/dev/full"))
    sink.add([record(1), record(2)])
    with pytest.raises(TransientError, match=r"rows file /dev/full: cannot write 2 rows \(No space left on device\)"):
        sink.flush()
    assert sink.buffered == 0  # dropped, as the RecordSink contract says: the pump buffers them again
    assert sink.rows_written == 0
    assert sink.failed_flushes == 1


def test_disk_full_holds_the_pump_then_recovers_without_restart_or_torn_line(tmp_path: Path) -> None:
    """A disk filling under a running pump: held, readiness red, no torn line; space freed: every row, once."""
    path = tmp_path / "rows.jsonl"
    one_row = len(record(1).model_dump_json()) + 1
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    completed = subprocess.run(
        [sys.executable, "-W", "error", "-m", "tests.unit.disk_full_worker", str(path), str(one_row * 3 // 2)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["held"], summary
    assert summary["ready_during_outage"] is False
    assert "record sink down" in summary["detail_during_outage"]
    assert "rows file" in summary["detail_during_outage"]
    assert summary["whole_during_outage"], "a torn line was left during the outage"
    assert summary["stopped"]
    assert summary["completed"] == 40
    assert summary["abandoned"] == 0
    assert summary["dead_letters"] == 0
    ids = rows_in(path)
    assert set(ids) == {json.loads(line)["EventId"] for line in path.read_text(encoding="utf-8").splitlines()}
    assert len(set(ids)) == 40
    assert "Traceback" not in completed.stderr
