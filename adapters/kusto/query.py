"""Read assignment counts back from Azure Data Explorer for ``ab-worker report`` (azure-kusto-data).

The query runs over the deduplicated view ``AssignmentEventsDedup()`` (deploy/kusto) and summarises
on the server, so what crosses the network is one row per experiment × segment × variant × split ×
hour × (in the experiment, reason, configuration version), not one per assignment. The view reads a
row ingested before the allocation columns existed (null ``InExperiment``, empty ``Reason``) as in the
experiment with the reason ``(before allocation)``; :func:`add_rows` reads nulls the same way, so an
older view gives the same counts. Rows outside the experiment come back too, to be shown by reason;
the tally keeps them out of the SRM test. User input (experiment id, times) travels as declared query
parameters, never spliced into the query text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.domain.errors import TransientError, WorkerError
from worker.domain.moments import as_utc, utc_iso
from worker.domain.srm.tally import ReportInputError, Tally, Window, in_experiment_of, parse_split, reason_of

if TYPE_CHECKING:
    from azure.kusto.data import KustoClient

#: The view that drops redelivered rows (same EventId); owned by deploy/kusto/functions.kql.
DEDUP_VIEW = "AssignmentEventsDedup()"

#: The columns allocation (issue 18) added to the table, which the query groups by.
ALLOCATION_COLUMNS = ("InExperiment", "Reason", "ConfigVersion")


class KustoQueryError(WorkerError):
    """The Kusto query could not run (authentication, network, missing function) or returned bad rows."""


def assignment_query(window: Window) -> tuple[str, dict[str, str]]:
    """The KQL text and its query parameters (name → value as a KQL literal) for ``window``."""
    declared: list[str] = []
    filters: list[str] = []
    parameters: dict[str, str] = {}
    if window.experiment is not None:
        declared.append("experiment:string")
        filters.append("| where ExperimentId == experiment")
        parameters["experiment"] = window.experiment
    if window.since is not None:
        declared.append("since:datetime")
        filters.append("| where AssignedAt >= since")
        parameters["since"] = f"datetime({utc_iso(window.since)})"
    if window.until is not None:
        declared.append("until:datetime")
        filters.append("| where AssignedAt < until")
        parameters["until"] = f"datetime({utc_iso(window.until)})"
    lines = [f"declare query_parameters({', '.join(declared)});"] if declared else []
    lines += [
        DEDUP_VIEW,
        *filters,
        "| summarize Assignments = count(), FirstSeen = min(AssignedAt), LastSeen = max(AssignedAt)",
        "    by ExperimentId, Segment, VariantId, Split = tostring(SplitRatio), Hour = bin(AssignedAt, 1h),",
        "    InExperiment, Reason, ConfigVersion",
    ]
    return "\n".join(lines), parameters


def add_rows(tally: Tally, rows: Iterable[Mapping[str, Any]]) -> None:
    """Count the query's summarised rows into ``tally`` (already deduplicated and filtered by Kusto).

    ``Any``: cells as the SDK decoded them, converted by trying; a cell that fails names its row.
    """
    for number, row in enumerate(rows, start=1):
        try:
            tally.add_cell(
                str(row["ExperimentId"]),
                str(row["Segment"] or ""),
                str(row["VariantId"]),
                parse_split(row["Split"]),
                _moment(row["Hour"]),
                count=int(row["Assignments"]),
                last_seen=_moment(row["LastSeen"]),
                first_seen=_moment(row["FirstSeen"]),
                in_experiment=in_experiment_of(row["InExperiment"]),
                reason=reason_of(row["Reason"]),
                config_version=str(row["ConfigVersion"] or ""),
            )
        except (KeyError, TypeError, ValueError, ReportInputError) as exc:
            raise KustoQueryError(f"Kusto result row {number} is not what the report expects: {exc}") from None
        tally.rows_read += int(row["Assignments"])


def _moment(value: object) -> datetime:
    if isinstance(value, datetime):
        return as_utc(value)
    return as_utc(datetime.fromisoformat(str(value)))


def connect(query_uri: str) -> KustoClient:
    """A ``KustoClient`` for the cluster: Entra ID through ``DefaultAzureCredential``.

    A plain ``http://`` URI (a local stand-in) connects without authentication.
    """
    from azure.kusto.data import KustoClient, KustoConnectionStringBuilder

    if query_uri.startswith("http://"):
        builder = KustoConnectionStringBuilder.with_no_authentication(query_uri)
    else:
        from azure.identity import DefaultAzureCredential

        builder = KustoConnectionStringBuilder.with_azure_token_credential(query_uri, DefaultAzureCredential())
    return KustoClient(builder)


def query_rows(client: KustoClient, database: str, window: Window) -> Iterator[dict[str, object]]:
    """Run :func:`assignment_query` and yield the primary result's rows as dicts (values as the SDK decoded them)."""
    from azure.core.exceptions import AzureError
    from azure.kusto.data import ClientRequestProperties
    from azure.kusto.data.exceptions import KustoError

    text, parameters = assignment_query(window)
    properties = ClientRequestProperties()  # type: ignore[no-untyped-call]  # the SDK has no annotations here
    properties.application = "ab-worker report"
    for name, value in parameters.items():
        properties.set_parameter(name, value)
    try:
        response = client.execute_query(database, text, properties)
    except KustoError as exc:
        raise KustoQueryError(f"Kusto query on database {database!r} failed: {exc}{_schema_hint(exc)}") from exc
    except AzureError as exc:  # unreachable cluster, rejected credential: azure.core's errors
        raise TransientError(f"Kusto query on database {database!r} failed: {type(exc).__name__}: {exc}") from None
    for row in response.primary_results[0]:
        yield dict(row.to_dict())


def _schema_hint(error: Exception) -> str:
    """Point at deploy/kusto when the cluster lacks the allocation columns (a database not yet updated)."""
    if any(column in str(error) for column in ALLOCATION_COLUMNS):
        return (
            " (the database predates the allocation columns: apply deploy/kusto/table.kql, mapping.kql and"
            " functions.kql; docs/operations.md, Kusto)"
        )
    return ""


def fill_tally(query_uri: str, database: str, tally: Tally) -> None:
    """Query the cluster for ``tally.window`` and count the result into ``tally``."""
    client = connect(query_uri)
    try:
        add_rows(tally, query_rows(client, database, tally.window))
    finally:
        client.close()  # type: ignore[no-untyped-call]  # the SDK has no annotations here
