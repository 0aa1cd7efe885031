"""Telemetry.shutdown keeps to its budget: a closer that never returns (a hung exporter) is left behind."""

from __future__ import annotations

import threading

from opentelemetry import metrics, trace

from adapters.telemetry import Telemetry


def telemetry_closing_with(closer: object) -> Telemetry:
    """A Telemetry whose only provider closes by calling ``closer``."""
    return Telemetry("none", trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), _closers=[closer])  # type: ignore[list-item]


def test_a_closer_that_never_returns_is_left_behind_at_the_budget() -> None:
    """shutdown() returns False once its budget is spent, while the closer still hangs."""
    release = threading.Event()
    telemetry = telemetry_closing_with(lambda timeout: release.wait())
    outcome: list[bool] = []
    caller = threading.Thread(target=lambda: outcome.append(telemetry.shutdown(timeout=0.2)))
    try:
        caller.start()
        caller.join(30)  # a guard against a shutdown that waits for the closer: it never would return
        assert not caller.is_alive(), "shutdown waited for a closer that never returns"
        assert outcome == [False]
    finally:
        release.set()


def test_closers_that_finish_flush_everything() -> None:
    """Closers that return: shutdown() says everything was flushed, each closer got the budget, once."""
    budgets: list[float] = []
    telemetry = telemetry_closing_with(budgets.append)
    assert telemetry.shutdown(timeout=5.0) is True
    assert telemetry.shutdown(timeout=5.0) is True  # a second shutdown does nothing
    assert budgets == [5.0]
