"""Waiting on a condition instead of sleeping and hoping: the one polling helper the tests share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(
    condition: Callable[[], object],
    timeout: float = 30,
    what: str = "the condition",
    interval: float = 0.02,
    detail: Callable[[], object] | None = None,
) -> None:
    """Poll ``condition`` until truthy; fail naming ``what`` after ``timeout`` s (generous: the cores are shared).

    ``detail``, when given, is called on a timeout and its result added to the failure message (a
    worker's stderr, the stand-in's errors): what a reader needs to see why the wait never ended.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def collect(fetch: Callable[[], Iterable[T]], count: int, timeout: float = 30, what: str = "") -> list[T]:
    """Call ``fetch`` (a receive that waits a little) until it has returned ``count`` items in all.

    Returns every item fetched (more than ``count`` when the last call brought more); fails naming
    ``what`` when fewer arrive within ``timeout`` s. For "nothing more arrives", ask the broker how
    many messages it holds instead of waiting a while for none.
    """
    got: list[T] = []

    def enough() -> bool:
        got.extend(fetch())
        return len(got) >= count

    wait_for(enough, timeout, what or f"{count} items", interval=0, detail=lambda: f"{len(got)} arrived")
    return got
