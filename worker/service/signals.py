"""The one way a long-running command answers SIGTERM and SIGINT.

:func:`on_signals` calls back on each signal while its block runs and, on the way out, puts back
whatever handlers were there before, so a command run inside a host (a test runner, another
command) leaves the process as it found it. The worker, the supervisor and the embedded broker all
use it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

#: What a platform sends to stop a process (SIGTERM), and Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def on_signals(
    callback: Callable[[signal.Signals], object], signals: Sequence[signal.Signals] = STOP_SIGNALS
) -> Iterator[list[signal.Signals]]:
    """While in the block, each of ``signals`` calls ``callback(signal)``; leaving restores the previous handlers.

    The block gets the list of the signals received, in order (a command exits 130 after a Ctrl-C).
    Only the main thread may install handlers: elsewhere (a command run in a test's thread) nothing
    is installed and the caller stops the work itself.
    """
    received: list[signal.Signals] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        callback(signal.Signals(signum))

    previous: dict[signal.Signals, signal._HANDLER] = {}  # typeshed's name for what signal.signal returns
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            # None: a handler not installed from Python; the default is the closest we can restore.
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
