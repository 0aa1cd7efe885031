"""The SRM report under allocation (issue 18): only assignments in the experiment are tested.

Overridden, launched, held-out and other users are served a variant without being in the experiment;
counting them would test the gates, not the assignment. They are shown per experiment by reason and
variant. Rows written before allocation carry no InExperiment/Reason/ConfigVersion and count as in
the experiment (the only assignments then were the seed rule's and the cohorts').
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from adapters.kusto.query import add_rows
from tests.synthetic_rows import START, make_rows, record, without_allocation
from worker.cli.render.html import render_html
from worker.cli.report import render_report
from worker.domain.srm.report import Report, build_report, report_from_rows
from worker.domain.srm.tally import BEFORE_ALLOCATION, ReportInputError, Tally, Window, parse_row, parse_split

NOW = datetime(2025, 11, 23, 18, 0, tzinfo=UTC)
HALF = {"A": 0.5, "B": 0.5}

#: 1,000 bucketed users on a 50/50 split, within noise (chi-square 0.1).
BUCKETED = make_rows("exp", {"A": 505, "B": 495}, HALF)
#: 500 QA users overridden onto B: served, never in the experiment.
OVERRIDDEN = make_rows("exp", {"B": 500}, HALF, reason="override")


def test_overridden_users_are_not_counted_so_no_false_srm() -> None:
    """1,000 bucketed rows on 50/50 plus 500 overrides all on B: no SRM; the overrides are shown by reason."""
    report = report_from_rows([*BUCKETED, *OVERRIDDEN], generated_at=NOW)

    (group,) = report.groups
    assert group.total == 1000
    assert {v.variant: v.observed for v in group.variants} == {"A": 505, "B": 495}
    assert group.chi2 == pytest.approx(0.1)
    assert not group.flagged
    assert report.counted == 1000
    assert report.not_counted == 500
    (allocation,) = report.allocations
    assert [(r.reason, r.in_experiment, r.total, r.variants) for r in allocation.reasons] == [
        ("bucketed", True, 1000, (("A", 505), ("B", 495))),
        ("override", False, 500, (("B", 500),)),
    ]


def test_the_same_rows_counted_would_flag() -> None:
    """The control: the same 500 rows in the experiment (505/995 on 50/50) are a glaring SRM, so the test
    above passes because the overrides are left out, not because the data is too weak to flag."""
    counted = make_rows("exp", {"B": 500}, HALF, reason="stratified")
    (group,) = report_from_rows([*BUCKETED, *counted], generated_at=NOW).groups
    assert group.total == 1500
    assert group.flagged
    assert group.p_value is not None
    assert group.p_value < 1e-20


def test_rows_from_before_allocation_count_as_in_the_experiment() -> None:
    """A row without InExperiment, Reason and ConfigVersion (run --rows before allocation) is counted, with the
    reason '(before allocation)' and no configuration; so 500 such rows on B do flag."""
    old = [without_allocation(row) for row in make_rows("exp", {"B": 500}, HALF, reason="stratified")]
    report = report_from_rows([*BUCKETED, *old], generated_at=NOW)

    (group,) = report.groups
    assert group.total == 1500
    assert group.flagged
    (allocation,) = report.allocations
    assert [(r.reason, r.in_experiment, r.total) for r in allocation.reasons] == [
        ("bucketed", True, 1000),
        (BEFORE_ALLOCATION, True, 500),
    ]
    assert {c.label: c.rows for c in allocation.configurations} == {"cfg-1": 1000, BEFORE_ALLOCATION: 500}


def test_kusto_nulls_read_like_missing_columns() -> None:
    """A Kusto row ingested before the columns existed reads null InExperiment and empty Reason: in the experiment."""
    row = record("exp", "A", HALF, START, user="u")
    parsed = parse_row({**row, "InExperiment": None, "Reason": "", "ConfigVersion": None})
    assert (parsed.in_experiment, parsed.reason, parsed.config_version) == (True, BEFORE_ALLOCATION, "")
    assert parse_row(without_allocation(row)) == parsed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"InExperiment": "true"}, "column InExperiment must be true, false or null, got 'true'"),
        ({"InExperiment": 1}, "column InExperiment must be true, false or null, got 1"),
        ({"Reason": 7}, "column Reason must be a reason of at most 64 characters, got 7"),
        ({"Reason": "x" * 65}, "column Reason must be a reason of at most 64 characters"),
        ({"InExperiment": False, "Reason": None}, "column Reason must say why a row with InExperiment false"),
        ({"ConfigVersion": 3}, "column ConfigVersion must be a non-empty string, got 3"),
    ],
)
def test_malformed_allocation_columns_are_named(change: dict[str, object], message: str) -> None:
    """A wrong type in the new columns is refused with the column named, like every other column."""
    with pytest.raises(ReportInputError, match=message):
        parse_row({**record("exp", "A", HALF, START, user="u"), **change})


def test_an_experiment_with_every_row_outside_it_says_nothing_was_tested() -> None:
    """A launched experiment (everyone served the winner, no one in it) gets a group that says so, with the
    reasons, instead of silently vanishing from the report; it is not flagged."""
    launched = make_rows("exp_launched", {"B": 300}, HALF, reason="launched")
    stopped = make_rows("exp_launched", {"A": 20}, HALF, reason="stopped")
    report = report_from_rows([*BUCKETED, *launched, *stopped], generated_at=NOW)

    groups = {g.experiment: g for g in report.groups}
    nothing = groups["exp_launched"]
    assert (nothing.total, nothing.variants, nothing.p_value, nothing.flagged, nothing.verdict) == (
        0,
        (),
        None,
        False,
        "n/a",
    )
    (note,) = nothing.notes
    assert note == (
        "nothing to test: all 320 assignments are outside the experiment (300 launched (B 300); 20 stopped (A 20));"
        " only in-experiment assignments are tested"
    )
    assert report.untested == (nothing,)
    assert [s.experiment for s in report.series] == ["exp"]  # the hourly series counts in-experiment rows only
    lines = render_report(report)
    assert "exp_launched  n=0  n/a" in lines
    assert lines[-1] == (
        "No sample ratio mismatch in the 1 tested (chi-square, every p >= 0.001); not tested: exp_launched"
        " (see the notes)."
    )


def test_a_report_with_nothing_in_any_experiment_says_nothing_was_tested() -> None:
    """Only excluded rows: the closing line says nothing was tested (not 'no sample ratio mismatch')."""
    report = report_from_rows(OVERRIDDEN, generated_at=NOW)
    lines = render_report(report)
    assert lines[0] == (
        "0 assignments counted from 500 rows (500 not in the experiment, 0 duplicate EventIds dropped,"
        " 0 outside the filters)"
    )
    assert lines[-1] == "Nothing tested: no group had anything to test (exp; see the notes)."
    assert not any("No sample ratio mismatch" in line for line in lines)


def test_text_lists_the_rows_not_counted_by_reason_and_variant() -> None:
    """The table says how many were left out, and a section lists them per experiment, reason and variant."""
    lines = render_report(report_from_rows([*BUCKETED, *OVERRIDDEN], generated_at=NOW))
    assert lines[0].startswith("1,000 assignments counted from 1,500 rows (500 not in the experiment,")
    index = lines.index("Served but not in the experiment (not tested), by reason and variant:")
    assert lines[index + 1] == "  exp  500: 500 override (B 500)"
    assert lines[-1].startswith("No sample ratio mismatch (chi-square")


def test_by_segment_counts_in_experiment_rows_only() -> None:
    """--by segment tests each segment's in-experiment rows; a segment's overrides change nothing."""
    rows = [
        *make_rows("exp", {"A": 50, "B": 50}, HALF, segment="vip"),
        *make_rows("exp", {"B": 80}, HALF, segment="vip", reason="override"),
    ]
    (group,) = report_from_rows(rows, by_segment=True, generated_at=NOW).groups
    assert (group.label, group.total, group.chi2) == ("exp / vip", 100, 0.0)


def test_duplicates_and_filters_apply_before_the_reason() -> None:
    """A redelivered override is dropped as a duplicate; an override after --until is outside the filters."""
    late = make_rows("exp", {"B": 10}, HALF, reason="override", start=START + timedelta(hours=7), hours=1)
    for row in late:
        row["EventId"] += "-late"
    rows = [*BUCKETED, *OVERRIDDEN, *OVERRIDDEN[:5], *late]
    report = report_from_rows(rows, window=Window(until=START + timedelta(hours=6)), generated_at=NOW)
    assert (report.duplicates, report.excluded, report.not_counted, report.counted) == (5, 10, 500, 1000)


def test_configuration_changes_are_noted() -> None:
    """Counted rows decided under two config_versions get a note naming both, with their rows and span."""
    first = make_rows("exp", {"A": 50, "B": 50}, HALF, config_version="aaaa", hours=2)
    second = make_rows(
        "exp", {"A": 50, "B": 50}, HALF, config_version="bbbb", start=START + timedelta(hours=3), hours=2
    )
    for row in second:
        row["EventId"] += "-second"
    report = report_from_rows([*first, *second], generated_at=NOW)
    (allocation,) = report.allocations
    assert [(c.config_version, c.rows) for c in allocation.configurations] == [("aaaa", 100), ("bbbb", 100)]
    (note,) = report.notes
    assert note.startswith(
        "exp: the counted rows were decided under 2 configurations (config_version): aaaa (100 rows,"
    )
    assert "bbbb (100 rows, 2025-11-23T12:00:00Z to" in note


def test_one_configuration_needs_no_note() -> None:
    report = report_from_rows([*BUCKETED, *OVERRIDDEN], generated_at=NOW)
    assert report.notes == ()


def test_json_has_the_counts_by_reason_and_configuration() -> None:
    """to_dict(): how many were left out, and per experiment every reason (counted or not) and configuration."""
    document = json.loads(json.dumps(report_from_rows([*BUCKETED, *OVERRIDDEN], generated_at=NOW).to_dict()))
    assert (document["assignments_counted"], document["not_in_experiment"]) == (1000, 500)
    (experiment,) = document["experiments"]
    assert experiment["experiment"] == "exp"
    assert (experiment["in_experiment"], experiment["not_in_experiment"]) == (1000, 500)
    assert experiment["reasons"] == [
        {"reason": "bucketed", "in_experiment": True, "assignments": 1000, "variants": {"A": 505, "B": 495}},
        {"reason": "override", "in_experiment": False, "assignments": 500, "variants": {"B": 500}},
    ]
    (configuration,) = experiment["config_versions"]
    assert configuration["config_version"] == "cfg-1"
    assert configuration["assignments"] == 1000
    assert configuration["first_seen"] == "2025-11-23T09:00:00Z"


def _cells(report_rows: list[dict[str, Any]]) -> Report:
    """The rows summarised the way the report's KQL does, then counted through add_rows()."""
    names = ("ExperimentId", "Segment", "VariantId", "Split", "Hour", "InExperiment", "Reason", "ConfigVersion")
    counts: Counter[tuple[Any, ...]] = Counter()
    spans: dict[tuple[Any, ...], tuple[datetime, datetime]] = {}
    for row in report_rows:
        at = datetime.fromisoformat(row["AssignedAt"])
        hour = at.replace(minute=0, second=0, microsecond=0)
        inside = row.get("InExperiment", True)
        reason = row.get("Reason") or BEFORE_ALLOCATION
        split = json.dumps(row["SplitRatio"])
        key = (row["ExperimentId"], row["Segment"], row["VariantId"], split, hour, inside, reason, row["ConfigVersion"])
        counts[key] += 1
        first, last = spans.get(key, (at, at))
        spans[key] = (min(first, at), max(last, at))
    tally = Tally()
    add_rows(
        tally,
        [
            {
                **dict(zip(names, key, strict=True)),
                "Assignments": n,
                "FirstSeen": spans[key][0],
                "LastSeen": spans[key][1],
            }
            for key, n in counts.items()
        ],
    )
    return build_report(tally, generated_at=NOW)


def test_summarised_kusto_cells_give_the_same_report_as_rows() -> None:
    """The --kusto path (cells with InExperiment and Reason) counts and lists exactly as the rows path does."""
    rows = [*BUCKETED, *OVERRIDDEN, *make_rows("exp_launched", {"B": 30}, HALF, reason="launched")]
    from_rows = report_from_rows(rows, generated_at=NOW)
    from_cells = _cells(rows)
    assert [(g.label, g.total, g.chi2, g.notes) for g in from_cells.groups] == [
        (g.label, g.total, g.chi2, g.notes) for g in from_rows.groups
    ]
    assert from_cells.allocations == from_rows.allocations
    assert from_cells.not_counted == 530


def test_kusto_cells_with_null_allocation_columns_count_as_in_the_experiment() -> None:
    """A cell from rows ingested before allocation (a view that does not normalise them) is counted."""
    tally = Tally()
    base = {"ExperimentId": "exp", "Segment": None, "Split": '{"A":0.5,"B":0.5}', "Hour": START}
    times = {"FirstSeen": START, "LastSeen": START + timedelta(minutes=5)}
    add_rows(
        tally,
        [
            {
                **base,
                **times,
                "VariantId": "A",
                "Assignments": 360,
                "InExperiment": None,
                "Reason": "",
                "ConfigVersion": "",
            },
            {
                **base,
                **times,
                "VariantId": "B",
                "Assignments": 240,
                "InExperiment": None,
                "Reason": None,
                "ConfigVersion": None,
            },
            {
                **base,
                **times,
                "VariantId": "B",
                "Assignments": 120,
                "InExperiment": False,
                "Reason": "holdout",
                "ConfigVersion": "c",
            },
        ],
    )
    report = build_report(tally, generated_at=NOW)
    (group,) = report.groups
    assert group.total == 600
    assert group.chi2 == pytest.approx(24.0)
    assert report.not_counted == 120
    assert tally.rows_read == 720


def test_add_cell_keeps_rows_outside_the_experiment_out_of_the_cells() -> None:
    """Tally.add_cell with in_experiment=False tallies the reason only: no cell, no series, no configuration."""
    tally = Tally()
    tally.add_cell("exp", "", "B", parse_split(HALF), START, count=7, in_experiment=False, reason="coverage")
    assert list(tally.cells()) == []
    assert tally.counted == 0
    assert tally.not_in_experiment == 7
    assert dict(tally.configurations) == {}


# --- HTML -------------------------------------------------------------------------------------------


def test_html_lists_assignments_by_reason() -> None:
    """The page has a table of every reason per experiment, counted or not, with the variants served."""
    page = render_html(report_from_rows([*BUCKETED, *OVERRIDDEN], generated_at=NOW))
    assert '<table id="reasons-table">' in page
    assert (
        '<tr class="not-counted" data-experiment="exp" data-reason="override"><td class="text">exp</td>'
        '<td class="text">override</td><td class="text">no</td><td>500</td><td class="text">B 500</td></tr>'
    ) in page
    assert (
        'data-reason="bucketed"><td class="text">exp</td><td class="text">bucketed</td><td class="text">yes</td>'
        in page
    )
    assert "500 not in the experiment" in page


def test_html_says_when_an_experiment_has_nothing_to_test() -> None:
    """An experiment with no in-experiment rows is a row of the SRM table that says so, and the banner too."""
    page = render_html(
        report_from_rows(make_rows("exp_launched", {"B": 30}, HALF, reason="launched"), generated_at=NOW)
    )
    assert '<tr class="untested" data-experiment="exp_launched" data-verdict="n/a">' in page
    assert "no in-experiment assignments to test" in page
    assert "Nothing tested: no group had anything to test (exp_launched; see the notes below the table)." in page
    assert "nothing to test: all 30 assignments are outside the experiment (30 launched (B 30))" in page
