"""A count and its noun, agreeing: ``1 request``, ``2 requests``; never ``1 requests`` nor ``request(s)``.

Every message that counts something (the command line's summaries, error descriptions, the report)
says it with :func:`counted`, so the number and the noun cannot disagree.
"""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None, *, thousands: bool = False) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``plural`` for irregular nouns: ``copy``/``copies``).

    ``thousands`` writes the number with comma separators (``1,234 rows``), as tables do.
    """
    number = f"{n:,}" if thousands else str(n)
    return f"{number} {noun if n == 1 else plural or noun + 's'}"
