"""Waiting on a condition instead of sleeping and hoping: the one polling helper the tests share."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_for(
    condition: Callable[[], object], timeout: float = 30, what: str = "the condition", interval: float = 0.02
) -> None:
    """Poll ``condition`` until truthy; fail naming ``what`` after ``timeout`` s (generous: the cores are shared)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
