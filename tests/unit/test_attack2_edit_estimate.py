"""``validate-config NEW --against OLD``: the moved-share estimate no longer walks every user once per segment.

A segment changes only the bucket step's table, so :func:`moved_shares` walks each synthetic user once
per file and looks each segment's tables up for all users at once. Its figures must be exactly the
plain walk's (:func:`moved_share`, kept as the reference) for every step that can decide before the
bucket; and its hashing must not grow with the number of segments (200 segments took 43 s).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

import worker.domain.allocation.experiment as experiment_module
from worker.domain.allocation.changes import changes, moved_share, moved_shares
from worker.domain.assignment import _md5 as md5_of_the_rule
from worker.domain.registry import ExperimentRegistry

AT = datetime(2026, 12, 1, tzinfo=UTC)
SPLIT = {"control": 0.5, "blue": 0.5}


def _pair(old: dict[str, Any], new: dict[str, Any], extra: dict[str, Any] | None = None) -> tuple[Any, Any]:
    def build(fields: dict[str, Any]) -> Any:
        document = {"experiments": [{"id": "e", "split": {"control": 0.5, "blue": 0.5}, **fields}], **(extra or {})}
        return ExperimentRegistry.from_dict(document).allocation.experiments["e"]

    return build(old), build(new)


SEGMENTS = {"US": {"control": 0.3, "blue": 0.7}, "CA": {"control": 0.9, "blue": 0.1}}
EDITS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "segment splits": ({"segments": SEGMENTS}, {"segments": {"US": {"control": 0.4, "blue": 0.6}}}),
    "coverage": ({"coverage": 0.7, "segments": SEGMENTS}, {"coverage": 0.4, "segments": SEGMENTS}),
    "seed": ({"seed": "a", "segments": SEGMENTS}, {"seed": "b", "segments": SEGMENTS}),
    "overrides and status": (
        {"segments": SEGMENTS, "overrides": {"synthetic-000007": "blue"}},
        {"segments": SEGMENTS, "status": "launched", "launched": "blue"},
    ),
    "schedule": ({"segments": SEGMENTS}, {"segments": SEGMENTS, "start_at": "2027-01-01T00:00:00Z"}),
    "holdout and layer": (
        {"segments": SEGMENTS, "layer": {"id": "L", "range": [0.0, 0.6]}},
        {"segments": SEGMENTS, "holdouts": ["H"], "layer": {"id": "L", "range": [0.2, 0.9]}},
    ),
    "targeting taken as matched": (
        {"segments": SEGMENTS},
        {"segments": {"CA": {"control": 0.5, "blue": 0.5}}, "targeting": {"plan": "gold"}},
    ),
}
LAYERS = {"layers": [{"id": "L"}], "holdouts": [{"id": "H", "share": 0.2}]}


@pytest.mark.parametrize("edit", list(EDITS))
def test_the_fast_estimate_equals_the_plain_walk_for_every_step(edit: str) -> None:
    """For no segment, each segment split in either file, and a segment in neither: the same shares."""
    old_fields, new_fields = EDITS[edit]
    before, after = _pair(old_fields, new_fields, LAYERS)
    segments = ["CA", "US", "elsewhere"]
    overall, by_segment = moved_shares(before, after, segments, AT, 3000)
    assert overall == moved_share(before, after, None, AT, 3000)
    assert by_segment == {segment: moved_share(before, after, segment, AT, 3000) for segment in segments}
    assert overall > 0 or any(by_segment.values()), "the edit must move someone, or the test proves nothing"


def test_hashing_does_not_grow_with_the_number_of_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every user is hashed once per file however many segments there are (it was once per segment)."""
    calls = 0
    real = md5_of_the_rule

    def counting(data: bytes) -> Any:
        nonlocal calls
        calls += 1
        return real(data)

    monkeypatch.setattr(experiment_module, "_md5", counting)
    many = {f"s{i:03d}": {"control": 0.3 + i / 1000, "blue": 0.7 - i / 1000} for i in range(100)}
    old = ExperimentRegistry.from_dict({"experiments": [{"id": "e", "split": SPLIT, "segments": many}]})
    even = dict.fromkeys(many, SPLIT)
    new = ExperimentRegistry.from_dict({"experiments": [{"id": "e", "split": SPLIT, "segments": even}]})
    calls = 0
    (change,) = changes(old.allocation, new.allocation, at=AT, sample=500).experiments
    assert len(change.segment_moved_share) == 100
    assert calls == 2 * 500
