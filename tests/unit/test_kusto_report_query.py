"""adapters/kusto_query: the report's KQL and how its summarised rows are counted (no cluster needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from adapters.kusto.query import KustoQueryError, add_rows, assignment_query
from worker.domain.srm.report import build_report
from worker.domain.srm.tally import Tally, Window

SINCE = datetime(2025, 11, 23, 9, 0, tzinfo=UTC)
UNTIL = datetime(2025, 11, 24, 9, 0, tzinfo=UTC)


def test_query_without_filters_summarises_the_dedup_view() -> None:
    """No filters: no declared parameters; the dedup view summarised per experiment, segment, variant, split, hour."""
    text, parameters = assignment_query(Window())
    assert parameters == {}
    assert text.splitlines()[0] == "AssignmentEventsDedup()"
    assert "by ExperimentId, Segment, VariantId, Split = tostring(SplitRatio), Hour = bin(AssignedAt, 1h)" in text


def test_filters_are_declared_parameters_never_query_text() -> None:
    """Experiment and times are passed as declared parameters (KQL literals), so no input can change the query."""
    experiment = "x' | take 1 //"
    text, parameters = assignment_query(Window(experiment, SINCE, UNTIL))
    assert experiment not in text
    assert text.splitlines()[0] == "declare query_parameters(experiment:string, since:datetime, until:datetime);"
    assert "| where AssignedAt >= since" in text
    assert "| where AssignedAt < until" in text
    assert parameters == {
        "experiment": experiment,
        "since": "datetime(2025-11-23T09:00:00Z)",
        "until": "datetime(2025-11-24T09:00:00Z)",
    }


def test_summarised_rows_are_counted_into_the_tally() -> None:
    """Each result row adds its count to its cell; the split arrives as tostring() text."""
    tally = Tally()
    add_rows(
        tally,
        [
            {
                "ExperimentId": "exp",
                "Segment": "",
                "VariantId": variant,
                "Split": '{"A":0.5,"B":0.5}',
                "Hour": SINCE,
                "Assignments": count,
                "LastSeen": "2025-11-23T09:59:00Z",
            }
            for variant, count in (("A", 360), ("B", 240))
        ],
    )
    (group,) = build_report(tally, generated_at=UNTIL).groups
    assert group.chi2 == pytest.approx(24.0)
    assert tally.rows_read == 600


def test_a_malformed_result_row_is_an_error_naming_the_row() -> None:
    """A result row missing a column (a changed view, say) fails with its row number."""
    with pytest.raises(KustoQueryError, match="Kusto result row 1 is not what the report expects"):
        add_rows(Tally(), [{"ExperimentId": "exp"}])
