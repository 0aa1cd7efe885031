"""Competing consumers: several worker processes on one queue lose nothing and duplicate nothing."""

from __future__ import annotations

import pytest

from bench import bench_scale

pytestmark = pytest.mark.integration


def test_two_worker_processes_share_a_queue_without_loss(capsys):
    """1 then 2 `ab-worker run` processes drain 1,500 requests each: every event id once, nothing left."""
    assert bench_scale.main(["--messages", "1500", "--workers", "1,2", "--batch", "100"]) == 0
    out = capsys.readouterr().out
    assert "1 worker(s):" in out
    assert "2 worker(s):" in out
    assert "lost 0" in out
