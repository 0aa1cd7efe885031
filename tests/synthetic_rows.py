"""Synthetic ``AssignmentEvents`` rows with exact, known counts, for the report's tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from schemas.models import AssignmentRecord

START = datetime(2025, 11, 23, 9, 0, tzinfo=UTC)
_NAMESPACE = uuid.UUID("6f1c1d1e-2f0b-4a55-9c1e-5a8f0d3b7a11")


def make_rows(
    experiment: str,
    counts: Mapping[str, int],
    split: Mapping[str, float],
    *,
    segment: str = "",
    start: datetime = START,
    hours: int = 6,
) -> list[dict[str, Any]]:
    """Exactly ``counts[variant]`` rows per variant, interleaved and spread evenly over ``hours`` hours."""
    order = [variant for variant, n in counts.items() for _ in range(n)]
    # Interleave deterministically so every hour sees every variant (a stride walk over the list).
    total = len(order)
    stride = 7919 if total % 7919 else 7907
    interleaved = [order[(i * stride) % total] for i in range(total)]
    step = timedelta(hours=hours) / max(total, 1)
    return [
        record(experiment, variant, split, start + step * i, segment=segment, user=f"{experiment}-{segment}-{i}")
        for i, variant in enumerate(interleaved)
    ]


def record(
    experiment: str, variant: str, split: Mapping[str, float], at: datetime, *, segment: str = "", user: str
) -> dict[str, Any]:
    """One row with every ``AssignmentRecord`` column (in column order), its ``EventId`` derived from the user."""
    values = {
        "EventId": str(uuid.uuid5(_NAMESPACE, f"{experiment}:{user}")),
        "AssignedAt": at.isoformat().replace("+00:00", "Z"),
        "ExperimentId": experiment,
        "ExperimentVersion": "1",
        "UserId": user,
        "VariantId": variant,
        "HashValue": 0.5,
        "Segment": segment,
        "Strategy": "md5_hash",
        "Seed": "echovoice",
        "SplitRatio": dict(split),
        "VariantMetadata": {},
        "Context": {},
        "RequestId": "",
        "CorrelationId": user,
        "SchemaVersion": "1.0",
    }
    # Columns added to the table later get empty values, so the rows keep the table's exact shape.
    empty = {"string": "", "dynamic": {}}
    return {name: values.get(name, empty.get(kind)) for name, kind in AssignmentRecord.kusto_columns()}


def monitoring_rows() -> list[dict[str, Any]]:
    """Three experiments over six hours; ``exp_skewed`` is 360/240 on a 50/50 split (chi-square 24)."""
    return [
        *make_rows("exp_balanced", {"A": 302, "B": 298}, {"A": 0.5, "B": 0.5}),
        *make_rows(
            "exp_tone",
            {"control": 198, "urgent": 203, "friendly": 199, "informational": 200},
            {"control": 0.25, "urgent": 0.25, "friendly": 0.25, "informational": 0.25},
        ),
        *make_rows("exp_skewed", {"A": 360, "B": 240}, {"A": 0.5, "B": 0.5}),
    ]


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines and return ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
