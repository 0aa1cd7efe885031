"""``ab-worker report --kusto`` through the real azure-kusto-data client, against a query endpoint on 127.0.0.1.

The stand-in answers ``POST /v2/rest/query`` in the v2 frame format, summarising synthetic rows the way
the query asks (per experiment, segment, variant, split and hour, filtered by the declared parameters),
and records each request so the test can check that user input travelled as parameters.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from tests.synthetic_rows import monitoring_rows
from worker.cli import main
from worker.cli.common import ExitStatus

pytestmark = pytest.mark.integration

COLUMNS = [
    ("ExperimentId", "string"),
    ("Segment", "string"),
    ("VariantId", "string"),
    ("Split", "string"),
    ("Hour", "datetime"),
    ("Assignments", "long"),
    ("LastSeen", "datetime"),
]


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def summarise(rows: list[dict[str, Any]], parameters: dict[str, str]) -> list[list[Any]]:
    """What the report's KQL returns for ``rows``, given its query parameters."""
    since = _moment(parameters["since"][len("datetime(") : -1]) if "since" in parameters else None
    until = _moment(parameters["until"][len("datetime(") : -1]) if "until" in parameters else None
    cells: dict[tuple[str, ...], list[Any]] = defaultdict(lambda: [0, None])
    for row in rows:
        at = _moment(row["AssignedAt"])
        if parameters.get("experiment", row["ExperimentId"]) != row["ExperimentId"]:
            continue
        if (since and at < since) or (until and at >= until):
            continue
        hour = at.replace(minute=0, second=0, microsecond=0)
        key = (row["ExperimentId"], row["Segment"], row["VariantId"], json.dumps(row["SplitRatio"]), hour.isoformat())
        cell = cells[key]
        cell[0] += 1
        cell[1] = max(cell[1] or at, at)
    return [[*key, count, seen.isoformat().replace("+00:00", "Z")] for key, (count, seen) in cells.items()]


class _KustoQueryStandIn(BaseHTTPRequestHandler):
    rows: ClassVar[list[dict[str, Any]]] = []
    requests: ClassVar[list[dict[str, Any]]] = []
    fail_with: ClassVar[int | None] = None

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        if self.fail_with is not None:
            self._send(self.fail_with, {"error": {"code": "General_BadRequest", "message": "Semantic error: boom"}})
            return
        properties = json.loads(body["properties"]) if isinstance(body.get("properties"), str) else body["properties"]
        result = summarise(self.rows, properties.get("Parameters", {}))
        self._send(200, _frames(result))

    def _send(self, status: int, document: Any) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def _frames(rows: list[list[Any]]) -> list[dict[str, Any]]:
    return [
        {"FrameType": "DataSetHeader", "IsProgressive": False, "Version": "v2.0"},
        {
            "FrameType": "DataTable",
            "TableId": 0,
            "TableKind": "PrimaryResult",
            "TableName": "PrimaryResult",
            "Columns": [{"ColumnName": name, "ColumnType": kind} for name, kind in COLUMNS],
            "Rows": rows,
        },
        {"FrameType": "DataSetCompletion", "HasErrors": False, "Cancelled": False},
    ]


@pytest.fixture
def kusto(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_KustoQueryStandIn]]:
    """A query endpoint on a free port, named by AB_WORKER_KUSTO_QUERY_URI for the duration of the test."""
    handler = type("Handler", (_KustoQueryStandIn,), {"rows": monitoring_rows(), "requests": [], "fail_with": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("AB_WORKER_KUSTO_QUERY_URI", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AB_WORKER_KUSTO_DATABASE", "experiments_test")
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_kusto_report_flags_the_skewed_experiment(
    kusto: type[_KustoQueryStandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    """The summarised Kusto result gives the same verdicts as the rows: exp_skewed flagged, exit 4."""
    assert main(["report", "--kusto"]) == ExitStatus.SRM
    out = capsys.readouterr().out
    assert "exp_skewed  n=600  SRM! p=9.6e-07  (chi2 24.00, dof 1)" in out
    assert "exp_tone  n=800  OK" in out
    (request,) = kusto.requests
    assert request["path"] == "/v2/rest/query"
    assert request["db"] == "experiments_test"
    assert request["csl"].startswith("AssignmentEventsDedup()")


def test_filters_travel_as_query_parameters(
    kusto: type[_KustoQueryStandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    """--experiment and --since are declared query parameters; the experiment id never enters the query text."""
    experiment = "exp_tone' | take 1 //"
    code = main(["report", "--kusto", "--experiment", experiment, "--since", "2025-11-23T10:00:00Z", "--json"])
    assert code == ExitStatus.OK
    (request,) = kusto.requests
    assert experiment not in request["csl"]
    assert request["csl"].startswith("declare query_parameters(experiment:string, since:datetime);")
    properties = json.loads(request["properties"]) if isinstance(request["properties"], str) else request["properties"]
    assert properties["Parameters"] == {"experiment": experiment, "since": "datetime(2025-11-23T10:00:00Z)"}
    assert json.loads(capsys.readouterr().out)["groups"] == []


def test_query_failure_is_a_refused_call(kusto: type[_KustoQueryStandIn], capsys: pytest.CaptureFixture[str]) -> None:
    """A query the cluster refuses exits 5 (Azure refused the call) with the service's message, no traceback."""
    kusto.fail_with = 400
    assert main(["report", "--kusto"]) == ExitStatus.UNREACHABLE
    err = capsys.readouterr().err
    assert "ab-worker report: error: Kusto query on database 'experiments_test' failed" in err
