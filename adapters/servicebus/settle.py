"""Settling many completions with one AMQP disposition per run of consecutive delivery ids."""

from __future__ import annotations

from collections.abc import Sequence

from worker.service.ports import Delivery


def _consecutive_runs(deliveries: Sequence[Delivery]) -> list[list[Delivery]]:
    """Split into runs whose AMQP delivery ids are consecutive (one disposition can cover each run)."""
    ordered = sorted(deliveries, key=lambda d: d.handle._delivery_id)
    runs: list[list[Delivery]] = []
    for delivery in ordered:
        if runs and delivery.handle._delivery_id == runs[-1][-1].handle._delivery_id + 1:
            runs[-1].append(delivery)
        else:
            runs.append([delivery])
    return runs
