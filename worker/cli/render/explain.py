"""An explanation as text: each step of the walk in order, then the variant and the reason.

The rows are the algebra's records (:class:`worker.domain.allocation.Explanation`) as they are, so
the text can say nothing the walk did not do; it never holds a context value because the records
never do (``docs/allocation.md`` §2.11).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from worker.domain.allocation import Explanation
from worker.domain.moments import utc_iso

HEADER = ("#", "step", "outcome", "hash input", "value", "threshold", "detail")


def render_explanation(
    explanation: Explanation, *, user_id: str, segment: str | None, at: datetime, experiment_version: str
) -> list[str]:
    """The heading, the table of steps and the decision, one string per line."""
    heading = (
        f"{explanation.experiment_id} v{experiment_version} (config {explanation.config_version}):"
        f" user {user_id!r}, segment {'-' if segment is None else repr(segment)}, at {utc_iso(at)}"
    )
    rows = [
        (
            str(number),
            record.step,
            record.outcome,
            record.hash_input or "",
            "" if record.hash_value is None else f"{record.hash_value:.6f}",
            record.threshold or "",
            record.detail,
        )
        for number, record in enumerate(explanation.steps, start=1)
    ]
    decision = explanation.decision
    verdict = (
        f"variant {decision.variant_id!r}, in_experiment {str(decision.in_experiment).lower()},"
        f" reason {decision.reason.value}"
    )
    return [heading, "", *_table(rows), "", verdict]


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    # Columns no step filled (no hash anywhere, say) are left out rather than printed empty.
    shown = [i for i in range(len(HEADER)) if i in (0, 1, 2, 6) or any(row[i] for row in rows)]
    widths = {i: max(len(HEADER[i]), *(len(row[i]) for row in rows)) for i in shown}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cells[i].ljust(widths[i]) for i in shown).rstrip()

    return [line(HEADER), line(tuple("-" * len(name) for name in HEADER)), *map(line, rows)]
