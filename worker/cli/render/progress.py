"""Progress bars for long file runs: a percentage and an ETA, because the input's size is known."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import IO


def file_progress(stack: ExitStack, binary: IO[bytes], size: int, stream: IO[str], desc: str) -> Callable[[int], None]:
    """A callback that moves a bar to ``binary``'s read position out of ``size`` bytes.

    Counting bytes read rather than rows keeps the total known up front, so the bar shows how far
    through the file the run is and when it will end; the bar closes (at 100%) with ``stack``.
    """
    from tqdm import tqdm

    bar = stack.enter_context(
        tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=stream, mininterval=0.5)
    )

    def advance(_: int = 0) -> None:
        bar.update(min(binary.tell(), size) - bar.n)

    stack.callback(advance)
    return advance
