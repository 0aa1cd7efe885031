"""deploy/dashboards: the workbook and alert rules parse, and every KQL query in them fits the data it reads.

No KQL parser is available for Python (PyPI has translators of KQL subsets to SQL, none that accepts
``mv-expand``, ``join`` or ``declare``), so the queries get structural checks: strings, brackets and
pipes are well formed, every operator after a pipe is a KQL operator, every capitalised name is a
column of ``AssignmentRecord``, a Kusto function's output, or defined in the query itself, and every
metric, dimension and span attribute the Application Insights queries read is one the worker emits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import chi2

from tests.kusto_artifacts import functions, table_columns
from worker.domain.srm.report import assigned_shares
from worker.domain.srm.tally import BEFORE_ALLOCATION

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "dashboards"
WORKBOOK = DASHBOARDS / "assignment-workbook.json"
ALERTS = DASHBOARDS / "alerts.json"
FUNCTIONS = ROOT / "deploy" / "kusto" / "functions.kql"
OBSERVE = ROOT / "worker" / "service" / "observe.py"

#: The table's columns as deployed (tests/unit/test_kusto_schema.py holds them to AssignmentRecord).
RECORD_COLUMNS = {name for name, _ in table_columns()}
#: The table and every function deploy/kusto/functions.kql defines.
KUSTO_FUNCTIONS = {"AssignmentEvents", *functions()}
APP_INSIGHTS_TABLES = {"customMetrics", "requests"}
PIPE_OPERATORS = {
    "where", "summarize", "extend", "project", "project-away", "order", "sort", "join", "mv-expand",
    "union", "distinct", "render", "top", "take", "count", "lookup",
}  # fmt: skip
#: How the worker's spans are named: f"{queue} process" (worker/service/observe.py).
SPAN_NAME_SUFFIX = " process"


def workbook() -> dict[str, Any]:
    return json.loads(WORKBOOK.read_text(encoding="utf-8"))


def alerts() -> dict[str, Any]:
    return json.loads(ALERTS.read_text(encoding="utf-8"))


# --- extracting the queries -------------------------------------------------------------------------


def workbook_queries() -> Iterator[tuple[str, str, str]]:
    """``(where, source, query)`` for every query in the workbook: items and parameter drop-downs."""

    def walk(items: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for item in items:
            content = item.get("content", {})
            if "query" in content:
                yield f"workbook item {item['name']}", _source(content), content["query"]
            for parameter in content.get("parameters", []):
                if "query" in parameter:
                    yield f"workbook parameter {parameter['name']}", _source(parameter), parameter["query"]
            yield from walk(content.get("items", []))

    yield from walk(workbook()["items"])


def _source(content: dict[str, Any]) -> str:
    return "kusto" if content.get("queryType") == 9 else "appinsights"


def alert_queries() -> Iterator[tuple[str, str, str]]:
    """``(where, source, query)`` for every alert rule's query, ARM expressions resolved."""
    template = alerts()
    for resource in template["resources"]:
        for criterion in resource["properties"]["criteria"].get("allOf", []):
            if "query" in criterion:
                query = _resolve(criterion["query"], template)
                source = "kusto" if "adx(" in query else "appinsights"
                yield f"alert {resource['name']}", source, query


def _resolve(expression: str, template: dict[str, Any]) -> str:
    """The two ARM expression shapes the template uses: a variable, or a variable with a placeholder replaced."""
    variable = re.fullmatch(r"\[variables\('(\w+)'\)\]", expression)
    if variable:
        return str(template["variables"][variable.group(1)])
    replaced = re.fullmatch(r"\[replace\(variables\('(\w+)'\), '(\w+)', parameters\('(\w+)'\)\)\]", expression)
    assert replaced, f"unexpected ARM expression {expression[:80]!r}"
    name, placeholder, parameter = replaced.groups()
    assert parameter in template["parameters"]
    text = str(template["variables"][name])
    assert placeholder in text
    return text.replace(placeholder, "https://mycluster.westeurope.kusto.windows.net/assignments")


def all_queries() -> list[tuple[str, str, str]]:
    return [*workbook_queries(), *alert_queries()]


QUERIES = all_queries()
IDS = [where for where, _, _ in QUERIES]


# --- a small KQL scanner ----------------------------------------------------------------------------


def strip_kql(query: str) -> str:
    """The query with ``//`` comments dropped and every string literal replaced by ``''``."""
    out: list[str] = []
    i = 0
    while i < len(query):
        if query.startswith("//", i):
            end = query.find("\n", i)
            i = len(query) if end < 0 else end
            continue
        char = query[i]
        if char in "'\"":
            j = i + 1
            while j < len(query) and query[j] != char:
                assert query[j] != "\n", f"string literal opened at {i} runs past the end of its line"
                j += 2 if query[j] == "\\" else 1
            assert j < len(query), f"unterminated string literal at {i}"
            out.append("''")
            i = j + 1
            continue
        out.append(char)
        i += 1
    return "".join(out)


def without_workbook_parameters(query: str) -> str:
    """Workbook parameters (``{TimeRange:grain}``, ``{SrmWindow}``) replaced by a timespan literal."""
    return re.sub(r"\{\w+(:\w+)?\}", "1h", query)


def code_of(query: str) -> str:
    return strip_kql(without_workbook_parameters(query))


def defined_names(code: str) -> set[str]:
    """Names the query creates: ``Name = expr`` in extend/summarize/project/mv-expand, and ``let`` names."""
    assigned = set(re.findall(r"\b([A-Za-z_]\w*)\s*=(?!=)", code))
    return assigned | set(re.findall(r"\blet\s+(\w+)", code))


def function_columns() -> set[str]:
    """Columns the functions of deploy/kusto/functions.kql return beyond the table's (their final ``project``)."""
    return {column for function in functions().values() for column in function.output_columns()}


def worker_telemetry() -> tuple[set[str], set[str]]:
    """The metric names and attribute keys (metric and span attributes) worker/service/observe.py emits."""
    source = OBSERVE.read_text(encoding="utf-8")
    metrics = set(re.findall(r"create_(?:counter|histogram)\(\s*\"([^\"]+)\"", source))
    metric_attributes = {
        key
        for attributes in re.findall(r"\.add\(\d+, \{([^}]*)\}", source)
        for key in re.findall(r"\"(\w+)\":", attributes)
    }
    span_attributes = set(re.findall(r"set_attribute\(\s*\"([^\"]+)\"", source))
    return metrics, metric_attributes | span_attributes


# --- the tests --------------------------------------------------------------------------------------


def test_files_parse_and_hold_queries() -> None:
    """Both files are JSON; the workbook has Kusto and Application Insights queries, the alerts three rules."""
    assert workbook()["version"] == "Notebook/1.0"
    sources = [source for _, source, _ in workbook_queries()]
    assert sources.count("kusto") >= 4
    assert sources.count("appinsights") >= 4
    assert len(list(alert_queries())) == 3


@pytest.mark.parametrize(("where", "source", "query"), QUERIES, ids=IDS)
def test_query_is_well_formed(where: str, source: str, query: str) -> None:
    """Strings close, brackets balance, no pipe dangles, and each pipe is followed by a KQL operator."""
    code = code_of(query)
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for position, char in enumerate(code):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack, f"{where}: unmatched {char!r} at {position}"
            assert stack.pop() == pairs[char], f"{where}: mismatched {char!r} at {position}"
    assert not stack, f"{where}: unclosed {stack}"
    assert not code.rstrip().endswith(("|", ",", "=")), f"{where}: query ends mid-expression"
    for operator in re.findall(r"\|\s*([A-Za-z][\w-]*)", code):
        assert operator in PIPE_OPERATORS, f"{where}: unknown operator after a pipe: {operator!r}"


@pytest.mark.parametrize(("where", "source", "query"), QUERIES, ids=IDS)
def test_every_capitalised_name_is_a_column_a_function_or_defined(where: str, source: str, query: str) -> None:
    """Kusto queries read only AssignmentRecord columns (or names they define); a typo'd column fails here."""
    code = code_of(query)
    known = defined_names(code) | KUSTO_FUNCTIONS
    if source == "kusto":
        known |= RECORD_COLUMNS | function_columns()
    for name in set(re.findall(r"(?<![\w.-])([A-Z]\w*)", code)):
        assert name in known, f"{where}: {name!r} is neither an AssignmentRecord column nor defined in the query"


@pytest.mark.parametrize(
    ("where", "source", "query"),
    [q for q in QUERIES if q[1] == "kusto"],
    ids=[q[0] for q in QUERIES if q[1] == "kusto"],
)
def test_kusto_queries_read_the_deduplicated_assignments(where: str, source: str, query: str) -> None:
    """Kusto queries read AssignmentEventsDedup()/AssignmentEventsInExperiment()/AssignmentSrm(), or dedup by
    EventId inline (cross-service)."""
    code = code_of(query)
    assert (
        "AssignmentEventsDedup()" in code
        or "AssignmentEventsInExperiment()" in code
        or "AssignmentSrm(" in code
        or ("AssignmentEvents" in code and "arg_max(AssignedAt, *) by EventId" in code)
    ), where


#: The panels and rules that count assignments (series, shares, SRM): in-experiment rows only.
COUNTING = [
    "workbook item assignments-over-time",
    "workbook item shares",
    "workbook item srm-overview",
    "workbook item srm-detail",
    "alert ab-worker-sample-ratio-mismatch",
]
#: The panels that show every row on purpose, split by whether it is counted.
BY_REASON = ["workbook item reasons", "workbook item config-versions"]


@pytest.mark.parametrize("where", COUNTING)
def test_counting_queries_read_in_experiment_rows_only(where: str) -> None:
    """Series, shares and SRM count only assignments in the experiment: through AssignmentEventsInExperiment()
    or AssignmentSrm(), or (the cross-service alert) filtering InExperiment with null as true; never the
    whole deduplicated view."""
    code = code_of({w: q for w, _, q in QUERIES}[where])
    if "adx(" in code:
        assert re.search(
            r"\| summarize arg_max\(AssignedAt, \*\) by EventId\s+\| where coalesce\(InExperiment, true\)", code
        )
    else:
        assert "AssignmentEventsInExperiment()" in code or "AssignmentSrm(" in code, where
        assert "AssignmentEventsDedup()" not in code, where


@pytest.mark.parametrize("where", BY_REASON)
def test_the_panels_of_every_row_split_them_by_reason_or_configuration(where: str) -> None:
    """The panels that read every row say which are counted: by Reason and InExperiment, or by ConfigVersion."""
    code = code_of({w: q for w, _, q in QUERIES}[where])
    assert "AssignmentEventsDedup()" in code
    assert re.search(r"by ExperimentId, (Reason, InExperiment|ExperimentVersion, ConfigVersion)", code), where


def test_every_kusto_query_is_either_counting_or_by_reason() -> None:
    """A new Kusto panel has to be put in one of the two lists above (and so checked by one of the tests)."""
    kusto = {where for where, source, _ in QUERIES if source == "kusto"}
    assert kusto - {"workbook parameter Experiment"} == set(COUNTING) | set(BY_REASON)


def test_the_views_count_null_in_experiment_as_true_and_label_old_rows() -> None:
    """AssignmentEventsDedup() reads a row ingested before allocation (null InExperiment, empty Reason) as in
    the experiment with the report's own label; AssignmentEventsInExperiment() keeps exactly those in it."""
    dedup = functions()["AssignmentEventsDedup"].body
    assert "InExperiment = coalesce(InExperiment, true)" in dedup
    assert f"Reason = iff(isempty(Reason), '{BEFORE_ALLOCATION}', Reason)" in dedup
    assert code_of(functions()["AssignmentEventsInExperiment"].body).split() == (
        ["{", "AssignmentEventsDedup()", "|", "where", "InExperiment", "}"]
    )
    srm = code_of(functions()["AssignmentSrm"].body)
    assert "AssignmentEventsInExperiment()" in srm
    assert "AssignmentEventsDedup()" not in srm


# --- expected shares: the rule's, not the ratios as written -----------------------------------------


def _kql_shares(split: dict[str, float]) -> dict[str, float]:
    """AssignmentSplitShares' formula for one split, evaluated as written in functions.kql: Below and Above
    from strcmp order (ordinal, as the rule's sorted()), then its ExpectedShare expression."""
    body = functions()["AssignmentSplitShares"].body
    (expression,) = re.findall(r"extend ExpectedShare = (.+)", body)
    scope = {"iff": lambda test, then, otherwise: then if test else otherwise, "min_of": min}
    shares = {}
    for variant, ratio in split.items():
        below = sum(r for other, r in split.items() if other < variant)
        above = sum(1 for other in split if other > variant)
        shares[variant] = eval(expression, scope, {"Below": below, "Above": above, "Ratio": ratio})
    return shares


@pytest.mark.parametrize(
    "split",
    [
        {"A": 0.5, "B": 0.5},
        {"A": 0.5, "B": 0.49},  # sums to 0.99: B takes the leftover
        {"A": 0.6, "B": 0.41},  # sums to 1.01: B is cut short
        {"control": 0.34, "blue": 0.33, "Green": 0.33},
        {"A": 0.3, "B": 0.3, "C": 0.39},
        {"A": 0.1, "B": 0.2, "C": 0.7},
        {"b": 0.25, "B": 0.25, "a": 0.25, "ä": 0.24},
    ],
)
def test_split_shares_agree_with_the_rule(split: dict[str, float]) -> None:
    """The KQL's expected shares equal the report's assigned_shares (the bucket ranges) to within one bucket
    in a million: a split summing to 0.99 expects half per arm, not the ratios as written."""
    expected = dict(assigned_shares(tuple(sorted(split.items()))))
    assert _kql_shares(split) == pytest.approx(expected, abs=1.1e-6)


def test_the_alert_computes_split_shares_as_the_function_does() -> None:
    """The alert runs cross-service and cannot call AssignmentSplitShares(); its inline copy is the same KQL."""

    def steps(text: str) -> list[str]:
        code = strip_kql(text)
        start = code.index("| distinct Split")
        end = code.index("| project Split, VariantId, ExpectedShare") + len("| project Split, VariantId, ExpectedShare")
        return re.sub(r"let shares = arms|arms\s*(?=\| join)", "", code[start:end]).split()

    (alert,) = [q for w, _, q in QUERIES if w == "alert ab-worker-sample-ratio-mismatch"]
    assert steps(alert) == steps(functions()["AssignmentSplitShares"].body)
    assert "ExpectedShare = todouble(Share[1])" not in alert


@pytest.mark.parametrize(
    ("where", "source", "query"),
    [q for q in QUERIES if q[1] == "appinsights"],
    ids=[q[0] for q in QUERIES if q[1] == "appinsights"],
)
def test_app_insights_queries_read_what_the_worker_emits(where: str, source: str, query: str) -> None:
    """Tables are customMetrics/requests; metric names, dimensions and span attributes are the worker's own."""
    metrics, attributes = worker_telemetry()
    code = without_workbook_parameters(query)
    lets = set(re.findall(r"\blet\s+(\w+)", code))
    tables = set(re.findall(r"^\s*(?:let \w+ = )?([A-Za-z]\w*)\s*$", code, re.MULTILINE)) - lets
    assert tables, f"{where}: no table"
    assert tables <= APP_INSIGHTS_TABLES, f"{where}: unknown tables {tables - APP_INSIGHTS_TABLES}"
    for metric in re.findall(r"name == '([^']+)'", code):
        assert metric in metrics, f"{where}: the worker emits no metric {metric!r} (it emits {sorted(metrics)})"
    for key in re.findall(r"customDimensions\['([^']+)'\]", code):
        assert key in attributes, f"{where}: the worker sets no attribute {key!r}"
    for suffix in re.findall(r"name endswith '([^']+)'", code):
        assert suffix == SPAN_NAME_SUFFIX, where
    assert 'f"{self.queue_name} process"' in OBSERVE.read_text(encoding="utf-8")


def test_workbook_covers_every_panel_the_operators_need() -> None:
    """Assignments over time, SRM (overview and AssignmentSrm), dead letters, latency, lock-lost and redelivery."""
    queries = {where: query for where, _, query in workbook_queries()}
    assert "bin(AssignedAt" in queries["workbook item assignments-over-time"]
    assert "AssignmentSrm('{Experiment}', {SrmWindow})" in queries["workbook item srm-detail"]
    assert "ChiSquare" in queries["workbook item srm-overview"]
    assert "ab.dead_letters" in queries["workbook item dead-letters-metric"]
    assert "ab.dead_letter_reason" in queries["workbook item dead-letters-spans"]
    assert "percentile(duration, 99)" in queries["workbook item latency"]
    assert "ab.processing.duration" in queries["workbook item latency-metric"]
    assert "ab.lock_lost" in queries["workbook item lock-lost-redelivery"]
    assert "delivery_count" in queries["workbook item lock-lost-redelivery"]
    assert "Reason, InExperiment" in queries["workbook item reasons"]
    assert "ConfigVersionsInRange = dcount(ConfigVersion)" in queries["workbook item config-versions"]
    assert "ConfigVersions" in queries["workbook item srm-detail"]


def test_srm_detail_says_when_there_is_nothing_to_test() -> None:
    """An experiment with no in-experiment rows in the window gets a message, not an empty grid."""
    (detail,) = [item for item in workbook()["items"] if item["name"] == "srm-detail"]
    assert "nothing to test" in detail["content"]["noDataMessage"]


def test_workbook_parameters_are_declared_and_item_names_unique() -> None:
    """Every {Parameter} a query uses is declared; item names are unique (the portal keys on them)."""
    document = workbook()
    (parameters,) = [item for item in document["items"] if item["type"] == 9]
    declared = {parameter["name"] for parameter in parameters["content"]["parameters"]}
    text = json.dumps(document)
    used = set(re.findall(r"\{([A-Za-z]\w*)(?::\w+)?\}", text))  # {0}, {1}: grid formatter text, not parameters
    assert used <= declared, f"undeclared workbook parameters: {used - declared}"
    names = [item["name"] for item in document["items"]]
    assert len(names) == len(set(names))


def test_chi_square_critical_values_are_p_0_001() -> None:
    """The critical values the KQL compares against are chi-square's at p = 0.001 for 1–10 degrees of freedom."""
    expected = [round(float(chi2.isf(0.001, dof)), 3) for dof in range(1, 11)]
    sources = [WORKBOOK.read_text(), ALERTS.read_text()]
    if FUNCTIONS.exists():
        sources.append(FUNCTIONS.read_text())
    for text in sources:
        (values,) = re.findall(r"dynamic\(\[([\d., ]+)\]\)", text)
        assert [float(v) for v in values.split(",")] == expected


def test_alert_rules() -> None:
    """DLQ growth on DeadletteredMessages, SRM hourly over a day, no traffic over 30 minutes; parameters declared."""
    template = alerts()
    rules = {resource["name"]: resource for resource in template["resources"]}
    dlq = rules["ab-worker-dlq-growth"]["properties"]["criteria"]["allOf"][0]
    assert dlq["metricName"] == "DeadletteredMessages"
    assert dlq["metricNamespace"] == "Microsoft.ServiceBus/namespaces"
    srm = rules["ab-worker-sample-ratio-mismatch"]
    assert srm["identity"] == {"type": "SystemAssigned"}
    assert srm["properties"]["windowSize"] == "P1D"
    quiet = rules["ab-worker-no-traffic"]["properties"]
    assert quiet["windowSize"] == "PT30M"
    assert quiet["criteria"]["allOf"][0]["operator"] == "LessThan"
    text = json.dumps(template)
    assert set(re.findall(r"parameters\('(\w+)'\)", text)) <= set(template["parameters"])
    assert set(re.findall(r"variables\('(\w+)'\)", text)) <= set(template["variables"])


def test_scanner_catches_what_it_should() -> None:
    """The checks themselves: a typo'd column, an unbalanced bracket and an unknown operator are caught."""
    typo = "AssignmentEventsDedup() | summarize N = count() by ExperimentID"
    names = set(re.findall(r"(?<![\w.-])([A-Z]\w*)", code_of(typo)))
    assert names - (defined_names(code_of(typo)) | KUSTO_FUNCTIONS | RECORD_COLUMNS) == {"ExperimentID"}
    with pytest.raises(AssertionError, match="unterminated"):
        strip_kql("T | where A == 'x")
    assert code_of("T | where A == ')' // (") == "T | where A == '' "
