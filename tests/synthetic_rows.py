"""Synthetic ``AssignmentEvents`` rows with exact, known counts, for the report's tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.kusto_artifacts import ALLOCATION_COLUMNS as ALLOCATION_KUSTO_COLUMNS
from tests.kusto_artifacts import expected_columns

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
    reason: str | None = "bucketed",
    config_version: str = "cfg-1",
) -> list[dict[str, Any]]:
    """Exactly ``counts[variant]`` rows per variant, interleaved and spread evenly over ``hours`` hours.

    ``reason`` and ``config_version`` as :func:`record` takes them (``None``: rows from before allocation).
    """
    order = [variant for variant, n in counts.items() for _ in range(n)]
    # Interleave deterministically so every hour sees every variant (a stride walk over the list).
    total = len(order)
    stride = 7919 if total % 7919 else 7907
    interleaved = [order[(i * stride) % total] for i in range(total)]
    step = timedelta(hours=hours) / max(total, 1)
    return [
        record(
            experiment,
            variant,
            split,
            start + step * i,
            segment=segment,
            user=f"{experiment}-{segment}-{i}" if reason == "bucketed" else f"{experiment}-{segment}-{reason}-{i}",
            reason=reason,
            config_version=config_version,
        )
        for i, variant in enumerate(interleaved)
    ]


def record(
    experiment: str,
    variant: str,
    split: Mapping[str, float],
    at: datetime,
    *,
    segment: str = "",
    user: str,
    reason: str | None = "bucketed",
    config_version: str = "cfg-1",
) -> dict[str, Any]:
    """One row with every ``AssignmentEvents`` column, in table order; its ``EventId`` derives from the user.

    The row carries allocation's ``InExperiment`` (true for ``bucketed`` and ``stratified`` only),
    ``Reason`` and ``ConfigVersion``, as the worker writes them, with ``HashValue`` null unless the reason
    is ``bucketed``; with ``reason=None`` it is a row as written before allocation (none of the three).
    """
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
    if reason is not None:
        inside = reason in IN_EXPERIMENT_REASONS
        values |= {"InExperiment": inside, "Reason": reason, "ConfigVersion": config_version}
        values["HashValue"] = 0.5 if reason == "bucketed" else None
    # Columns added to the table later get empty values, so the rows keep the table's exact shape
    # (allocation's three only when the row has them: a row from before allocation has none).
    empty = {"string": "", "dynamic": {}}
    return {
        name: values.get(name, empty.get(kind))
        for name, kind in expected_columns()
        if name in values or name not in ALLOCATION_COLUMNS
    }


#: The columns allocation (issue 18) added to every row; a row written before it has none of them.
ALLOCATION_COLUMNS = tuple(name for name, _ in ALLOCATION_KUSTO_COLUMNS)

#: The reasons that put a user in the experiment (docs/allocation.md); every other reason is served, not counted.
IN_EXPERIMENT_REASONS = frozenset({"bucketed", "stratified"})


def without_allocation(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` as written before allocation: no ``InExperiment``, ``Reason`` or ``ConfigVersion``."""
    return {name: value for name, value in row.items() if name not in ALLOCATION_COLUMNS}


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
