"""``ab-worker report --kusto`` through the real azure-kusto-data client, against a query endpoint on 127.0.0.1.

The stand-in answers ``POST /v2/rest/query`` in the v2 frame format, summarising synthetic rows the way
the query asks (per experiment, segment, variant, split, hour, in the experiment or not, reason and
configuration, filtered by the declared parameters), and records each request so the test can check
that user input travelled as parameters. It does not run KQL: what it returns is what the query's
``summarize`` over ``AssignmentEventsDedup()`` returns (rows from before allocation read as in the
experiment, reason ``(before allocation)``, as functions.kql defines the view); the query's text is
checked against that grain here and, with the view's definition, in tests/unit/test_kusto_report_query.py.
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

from tests.synthetic_rows import make_rows, monitoring_rows, without_allocation
from worker.cli import main
from worker.cli.common import ExitStatus
from worker.domain.srm.tally import BEFORE_ALLOCATION

pytestmark = pytest.mark.integration

COLUMNS = [
    ("ExperimentId", "string"),
    ("Segment", "string"),
    ("VariantId", "string"),
    ("Split", "string"),
    ("Hour", "datetime"),
    ("InExperiment", "bool"),
    ("Reason", "string"),
    ("ConfigVersion", "string"),
    ("Assignments", "long"),
    ("FirstSeen", "datetime"),
    ("LastSeen", "datetime"),
]
#: The query's grain: what it summarises by (the columns before the counts).
GRAIN = [name for name, _ in COLUMNS[: COLUMNS.index(("Assignments", "long"))]]


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def summarise(rows: list[dict[str, Any]], parameters: dict[str, str]) -> list[list[Any]]:
    """What the report's KQL returns for ``rows``, given its query parameters."""
    since = _moment(parameters["since"][len("datetime(") : -1]) if "since" in parameters else None
    until = _moment(parameters["until"][len("datetime(") : -1]) if "until" in parameters else None
    cells: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, None, None])
    for row in rows:
        at = _moment(row["AssignedAt"])
        if parameters.get("experiment", row["ExperimentId"]) != row["ExperimentId"]:
            continue
        if (since and at < since) or (until and at >= until):
            continue
        hour = at.replace(minute=0, second=0, microsecond=0)
        # As AssignmentEventsDedup() reads them: null InExperiment is true, an empty Reason is labelled.
        inside = True if row.get("InExperiment") is None else row["InExperiment"]
        reason = row.get("Reason") or BEFORE_ALLOCATION
        key = (
            row["ExperimentId"], row["Segment"], row["VariantId"], json.dumps(row["SplitRatio"]), hour.isoformat(),
            inside, reason, row.get("ConfigVersion") or "",
        )  # fmt: skip
        cell = cells[key]
        cell[0] += 1
        cell[1] = min(cell[1] or at, at)
        cell[2] = max(cell[2] or at, at)
    return [[*key, count, _text(first), _text(last)] for key, (count, first, last) in cells.items()]


def _text(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


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


def test_the_stand_in_groups_by_what_the_query_summarises_by(
    kusto: type[_KustoQueryStandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    """The query's ``by`` clause is exactly the stand-in's grain, so the stand-in answers what the query asks."""
    main(["report", "--kusto"])
    (request,) = kusto.requests
    by = " ".join(request["csl"].split()).split(" by ", 1)[1]
    parts, depth, current = [], 0, ""
    for char in by + ",":  # split at the commas outside brackets: bin(AssignedAt, 1h) is one key
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.split("=", maxsplit=1)[0].strip())
            current = ""
        else:
            current += char
    assert parts == GRAIN


def test_kusto_report_counts_in_experiment_rows_only(
    kusto: type[_KustoQueryStandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real client: 500 overrides on B beside 1,000 bucketed rows on 50/50 are listed, not counted
    (no SRM); rows from before allocation are counted; an all-launched experiment says nothing was tested."""
    half = {"A": 0.5, "B": 0.5}
    kusto.rows = [
        *make_rows("exp", {"A": 505, "B": 495}, half),
        *make_rows("exp", {"B": 500}, half, reason="override"),
        *[without_allocation(row) for row in make_rows("exp_old", {"A": 100, "B": 100}, half)],
        *make_rows("exp_launched", {"B": 40}, half, reason="launched"),
    ]
    assert main(["report", "--kusto"]) == ExitStatus.OK
    out = capsys.readouterr().out
    assert out.startswith("1,200 assignments counted from 1,740 rows (540 not in the experiment,")
    assert "exp  n=1,000  OK  (chi2 0.10, dof 1, p=0.75)" in out
    assert "exp_old  n=200  OK" in out
    assert "exp_launched  n=0  n/a" in out
    assert "  exp  500: 500 override (B 500)" in out
    assert "not tested: exp_launched (see the notes)." in out

    assert main(["report", "--kusto", "--json"]) == ExitStatus.OK
    document = json.loads(capsys.readouterr().out)
    reasons = {
        e["experiment"]: [(r["reason"], r["in_experiment"]) for r in e["reasons"]] for e in document["experiments"]
    }
    assert reasons == {
        "exp": [("bucketed", True), ("override", False)],
        "exp_launched": [("launched", False)],
        "exp_old": [(BEFORE_ALLOCATION, True)],
    }


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
