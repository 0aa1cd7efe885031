"""The SRM report's numbers as people read them: p-values and splits in one short form everywhere.

The terminal table, the HTML page and the demo summary all print through these, so a p-value
never reads differently in two places.
"""

from __future__ import annotations

from worker.domain.srm.tally import Split


def format_p(p_value: float) -> str:
    """``p=0.42``, ``p=0.0071``, ``p=3.1e-09``; ``p<1e-300`` when the tail underflowed to zero."""
    if p_value == 0.0:
        return "p<1e-300"
    return f"p={p_value:.2f}" if p_value >= 0.01 else f"p={p_value:.2g}"


def format_split(split: Split) -> str:
    """``A=0.5,B=0.5``."""
    return ",".join(f"{variant}={share:g}" for variant, share in split)
