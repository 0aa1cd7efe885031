"""adapters/kusto_query: the report's KQL and how its summarised rows are counted (no cluster needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from adapters.kusto.query import KustoQueryError, add_rows, assignment_query, query_rows
from tests.kusto_artifacts import functions
from worker.domain.srm.report import build_report
from worker.domain.srm.tally import BEFORE_ALLOCATION, Tally, Window

SINCE = datetime(2025, 11, 23, 9, 0, tzinfo=UTC)
UNTIL = datetime(2025, 11, 24, 9, 0, tzinfo=UTC)


def test_query_without_filters_summarises_the_dedup_view() -> None:
    """No filters: no declared parameters; the dedup view summarised per experiment, segment, variant, split,
    hour, and whether the rows are in the experiment, why, and under which configuration."""
    text, parameters = assignment_query(Window())
    assert parameters == {}
    assert text.splitlines()[0] == "AssignmentEventsDedup()"
    assert " ".join(text.split()).endswith(
        "| summarize Assignments = count(), FirstSeen = min(AssignedAt), LastSeen = max(AssignedAt)"
        " by ExperimentId, Segment, VariantId, Split = tostring(SplitRatio), Hour = bin(AssignedAt, 1h),"
        " InExperiment, Reason, ConfigVersion"
    )


def test_the_query_reads_the_view_that_labels_rows_from_before_allocation() -> None:
    """The query groups by InExperiment and Reason from AssignmentEventsDedup(), which functions.kql defines to
    read a row ingested before allocation (null InExperiment) as in the experiment: the stand-in cannot run
    KQL, so this holds the query and the function to each other by text."""
    text, _ = assignment_query(Window())
    dedup = functions()["AssignmentEventsDedup"]
    assert text.startswith(f"{dedup.name}()")
    assert "InExperiment = coalesce(InExperiment, true)" in dedup.body
    assert f"iff(isempty(Reason), '{BEFORE_ALLOCATION}', Reason)" in dedup.body


def test_a_database_without_the_allocation_columns_gets_a_hint() -> None:
    """A cluster whose table predates allocation refuses the query naming a column: the error says what to apply."""
    from azure.kusto.data.exceptions import KustoServiceError

    class Refusing:
        def execute_query(self, *_: object) -> None:
            raise KustoServiceError("Semantic error: 'summarize' operator: Failed to resolve column 'InExperiment'")

    refusing: Any = Refusing()  # a KustoClient as far as query_rows reaches
    with pytest.raises(KustoQueryError, match=r"apply deploy/kusto/table\.kql, mapping\.kql and functions\.kql"):
        list(query_rows(refusing, "assignments", Window()))


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
    """Each result row adds its count to its cell; the split arrives as tostring() text; rows outside the
    experiment are read (rows_read) and listed by reason, never counted into the test."""
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
                "InExperiment": inside,
                "Reason": reason,
                "ConfigVersion": "0123456789abcdef",
                "Assignments": count,
                "FirstSeen": "2025-11-23T09:00:00Z",
                "LastSeen": "2025-11-23T09:59:00Z",
            }
            for variant, count, inside, reason in (
                ("A", 360, True, "bucketed"),
                ("B", 240, True, "bucketed"),
                ("B", 500, False, "override"),
            )
        ],
    )
    report = build_report(tally, generated_at=UNTIL)
    (group,) = report.groups
    assert group.chi2 == pytest.approx(24.0)
    assert tally.rows_read == 1100
    assert report.not_counted == 500
    (allocation,) = report.allocations
    (configuration,) = allocation.configurations
    assert (configuration.config_version, configuration.rows) == ("0123456789abcdef", 600)
    assert configuration.first_seen == SINCE


def test_a_malformed_result_row_is_an_error_naming_the_row() -> None:
    """A result row missing a column (a changed view, say) fails with its row number."""
    with pytest.raises(KustoQueryError, match="Kusto result row 1 is not what the report expects"):
        add_rows(Tally(), [{"ExperimentId": "exp"}])
