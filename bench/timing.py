"""The one clock every side-by-side benchmark reads its contenders' times from."""

from __future__ import annotations

import time
from collections.abc import Callable


def cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU seconds of this process that ``fn()`` took.

    CPU time, not wall time: on a shared machine the wall clock also counts the time other processes
    held the core, which lands on whichever contender was running.
    """
    start = time.process_time()
    fn()
    return time.process_time() - start
