"""Sample-ratio monitoring (srm.report): deduplication, filters, segments, the SRM test, hourly buckets."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta

import pytest

from schemas.models import AssignmentRecord
from tests.kusto_artifacts import expected_columns
from tests.synthetic_rows import START, make_rows, monitoring_rows, record
from worker.cli.render.html import render_html
from worker.domain.moments import MomentError, parse_moment
from worker.domain.srm.format import format_p
from worker.domain.srm.report import GroupResult, Report, build_report, report_from_rows
from worker.domain.srm.tally import ReportInputError, Tally, Window, parse_row, parse_split

NOW = datetime(2025, 11, 23, 18, 0, tzinfo=UTC)
HALF = {"A": 0.5, "B": 0.5}


def by_label(report: Report) -> dict[str, GroupResult]:
    return {group.label: group for group in report.groups}


def test_synthetic_rows_are_valid_assignment_records() -> None:
    """The test rows have exactly the Kusto table's columns and validate as AssignmentRecord (in the
    columns the model has: allocation's three are the table's before they are the model's)."""
    row = monitoring_rows()[0]
    assert list(row) == [name for name, _ in expected_columns()]
    AssignmentRecord.model_validate({name: row[name] for name in AssignmentRecord.model_fields})


# --- deduplication and filters ----------------------------------------------------------------------


def test_duplicate_event_ids_are_counted_once() -> None:
    """A redelivered request's identical row (same EventId) is dropped and counted as a duplicate."""
    rows = make_rows("exp", {"A": 50, "B": 50}, HALF)
    report = report_from_rows([*rows, *rows[:10], rows[0]], generated_at=NOW)
    (group,) = report.groups
    assert group.total == 100
    assert (report.rows_read, report.duplicates, report.excluded) == (111, 11, 0)


def test_experiment_filter_keeps_one_experiment() -> None:
    """--experiment keeps that experiment's rows only; the rest are counted as excluded."""
    report = report_from_rows(monitoring_rows(), window=Window(experiment="exp_tone"), generated_at=NOW)
    assert [g.experiment for g in report.groups] == ["exp_tone"]
    assert report.excluded == 1200
    assert [s.experiment for s in report.series] == ["exp_tone"]


def test_since_is_inclusive_and_until_exclusive() -> None:
    """A row exactly at --since is counted; a row exactly at --until is not."""
    rows = [
        record("exp", "A", HALF, START, user="at-since"),
        record("exp", "B", HALF, START + timedelta(hours=1), user="inside"),
        record("exp", "A", HALF, START + timedelta(hours=2), user="at-until"),
        record("exp", "B", HALF, START - timedelta(seconds=1), user="before"),
    ]
    window = Window(since=START, until=START + timedelta(hours=2))
    report = report_from_rows(rows, window=window, generated_at=NOW)
    (group,) = report.groups
    assert {v.variant: v.observed for v in group.variants} == {"A": 1, "B": 1}
    assert report.excluded == 2


def test_parse_moment_accepts_durations_and_iso_times() -> None:
    """2h, 30m, 7d and 1w count back from now; ISO times with Z, offsets or no zone (UTC) parse."""
    assert parse_moment("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_moment("30m", NOW) == NOW - timedelta(minutes=30)
    assert parse_moment("7d", NOW) == NOW - timedelta(days=7)
    assert parse_moment("1w", NOW) == NOW - timedelta(weeks=1)
    assert parse_moment("2025-11-23T09:00:00Z", NOW) == START
    assert parse_moment("2025-11-23T10:00:00+01:00", NOW) == START
    assert parse_moment("2025-11-23T09:00:00", NOW) == START
    assert parse_moment("2025-11-23", NOW) == datetime(2025, 11, 23, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "2x", "-2h", "2025-13-01"])
def test_parse_moment_rejects_other_text(text: str) -> None:
    """Anything but a duration or an ISO time is an error that shows the accepted forms."""
    with pytest.raises(MomentError, match="30m, 2h, 7d"):
        parse_moment(text, NOW)


# --- rows -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"EventId": ""}, "EventId"),
        ({"AssignedAt": "soon"}, "AssignedAt"),
        ({"ExperimentId": None}, "ExperimentId"),
        ({"VariantId": 3}, "VariantId"),
        ({"SplitRatio": {}}, "SplitRatio"),
        ({"SplitRatio": {"A": "half"}}, "SplitRatio"),
        ({"SplitRatio": {"A": -0.5, "B": 1.5}}, "SplitRatio"),
        ({"SplitRatio": {"A": True}}, "SplitRatio"),
    ],
)
def test_parse_row_names_the_bad_column(change: dict[str, object], column: str) -> None:
    """A malformed row is refused with the offending column named."""
    row = {**record("exp", "A", HALF, START, user="u"), **change}
    with pytest.raises(ReportInputError, match=column):
        parse_row(row)


def test_parse_row_tolerates_missing_segment_and_extra_columns() -> None:
    """Segment may be absent or null (no segment); columns the report does not use are ignored."""
    row = record("exp", "A", HALF, START, user="u")
    del row["Segment"]
    row["NewColumn"] = 1
    assert parse_row(row).segment == ""
    assert parse_row({**row, "Segment": None}).segment == ""


def test_parse_split_accepts_kusto_tostring_text() -> None:
    """A split as JSON text (Kusto's tostring of the dynamic column) equals the same split as an object."""
    assert parse_split('{"B":0.5,"A":0.5}') == parse_split(HALF) == (("A", 0.5), ("B", 0.5))


# --- the SRM test -----------------------------------------------------------------------------------


def test_skewed_stream_is_flagged_with_the_known_chi_square() -> None:
    """360/240 on a 50/50 split: chi-square (60²/300)·2 = 24, p = erfc(√12) ≈ 9.6e-7 < 0.001: flagged."""
    report = report_from_rows(monitoring_rows(), generated_at=NOW)
    skewed = by_label(report)["exp_skewed"]
    assert skewed.chi2 == pytest.approx(24.0)
    assert skewed.dof == 1
    assert skewed.p_value == pytest.approx(math.erfc(math.sqrt(12.0)), rel=1e-9)
    assert skewed.flagged
    assert skewed.verdict == "SRM! p=9.6e-07"
    assert [g.label for g in report.flagged] == ["exp_skewed"]


def test_balanced_experiments_are_ok() -> None:
    """Counts within noise of the split pass, with their shares reported."""
    groups = by_label(report_from_rows(monitoring_rows(), generated_at=NOW))
    tone = groups["exp_tone"]
    assert tone.verdict == "OK"
    assert tone.dof == 3
    # chi-square = (4 + 9 + 1 + 0) / 200
    assert tone.chi2 == pytest.approx(14 / 200)
    variants = {v.variant: v for v in tone.variants}
    assert variants["urgent"].observed == 203
    assert variants["urgent"].observed_share == pytest.approx(203 / 800)
    assert variants["urgent"].expected_share == pytest.approx(0.25)


def test_by_segment_tests_each_segment_against_its_own_split() -> None:
    """--by segment: one test per experiment × segment, each against that segment's split."""
    rows = [
        *make_rows("exp", {"A": 40, "B": 60}, {"A": 0.4, "B": 0.6}, segment="high_intent"),
        *make_rows("exp", {"A": 80, "B": 20}, {"A": 0.8, "B": 0.2}, segment="low_intent"),
        *make_rows("exp", {"A": 70, "B": 30}, HALF),
    ]
    report = report_from_rows(rows, by_segment=True, generated_at=NOW)
    groups = by_label(report)
    assert list(groups) == ["exp / (no segment)", "exp / high_intent", "exp / low_intent"]
    assert groups["exp / high_intent"].chi2 == pytest.approx(0.0)
    assert groups["exp / low_intent"].verdict == "OK"
    # 70/30 on 50/50: chi-square 16, p ≈ 6.3e-5
    assert groups["exp / (no segment)"].chi2 == pytest.approx(16.0)
    assert groups["exp / (no segment)"].flagged
    assert [g.segment for g in report.flagged] == [""]


def test_rows_are_expected_under_their_own_split_when_it_changed() -> None:
    """A mid-experiment change from 50/50 to 90/10 is not an SRM; testing against the latest split alone would be."""
    before = make_rows("exp", {"A": 100, "B": 100}, HALF, start=START)
    after = make_rows("exp", {"A": 180, "B": 20}, {"A": 0.9, "B": 0.1}, start=START + timedelta(hours=6))
    for row in after:
        row["EventId"] += "-after"
    (group,) = report_from_rows([*before, *after], generated_at=NOW).groups
    assert {v.variant: v.expected for v in group.variants} == pytest.approx({"A": 280.0, "B": 120.0})
    assert not group.flagged
    assert group.chi2 == pytest.approx(0.0)
    assert group.latest_split == (("A", 0.9), ("B", 0.1))
    (note,) = group.notes
    assert "2 different splits" in note
    assert "Most recent: A=0.9,B=0.1" in note


def test_segment_overrides_pooled_per_experiment_are_not_flagged() -> None:
    """Per experiment, rows from segments with different splits are each expected under their segment's split."""
    rows = [
        *make_rows("exp", {"A": 40, "B": 60}, {"A": 0.4, "B": 0.6}, segment="high_intent"),
        *make_rows("exp", {"A": 80, "B": 20}, {"A": 0.8, "B": 0.2}, segment="low_intent"),
    ]
    (group,) = report_from_rows(rows, generated_at=NOW).groups
    assert group.chi2 == pytest.approx(0.0)
    assert {v.variant: v.expected_share for v in group.variants} == pytest.approx({"A": 0.6, "B": 0.4})


def test_variant_outside_the_split_is_flagged() -> None:
    """A row assigned to a variant its split gives no share is a broken pipeline: flagged, p = 0."""
    rows = [*make_rows("exp", {"A": 50, "B": 50}, HALF), record("exp", "C", HALF, START, user="stray")]
    (group,) = report_from_rows(rows, generated_at=NOW).groups
    assert group.flagged
    assert group.p_value == 0.0
    assert group.verdict == "SRM! p<1e-300"
    assert "C observed but given no share" in group.notes[0]


def test_single_variant_experiment_has_nothing_to_test() -> None:
    """An experiment with one variant (a holdout at 100%) is reported, not tested, and not flagged."""
    (group,) = report_from_rows(make_rows("exp", {"A": 10}, {"A": 1.0}), generated_at=NOW).groups
    assert group.verdict == "n/a"
    assert not group.flagged
    assert "no SRM test" in group.notes[0]


def test_format_p() -> None:
    """p-values print with two decimals above 0.01, two significant digits below."""
    assert format_p(0.8751) == "p=0.88"
    assert format_p(0.0071) == "p=0.0071"
    assert format_p(9.634e-7) == "p=9.6e-07"


# --- hourly buckets ---------------------------------------------------------------------------------


def test_series_has_every_hour_from_first_to_last_with_zeros() -> None:
    """Assignments are bucketed by UTC hour; hours with none are present with zero counts."""
    rows = [
        record("exp", "A", HALF, START + timedelta(minutes=5), user="1"),
        record("exp", "A", HALF, START + timedelta(minutes=59, seconds=59), user="2"),
        record("exp", "B", HALF, START + timedelta(hours=1), user="3"),
        record("exp", "B", HALF, START + timedelta(hours=3, minutes=30), user="4"),
    ]
    (series,) = report_from_rows(rows, generated_at=NOW).series
    assert series.hours == tuple(START + timedelta(hours=h) for h in range(4))
    assert series.counts == {"A": (2, 0, 0, 0), "B": (0, 1, 0, 1)}


def test_series_buckets_in_utc_whatever_the_offset() -> None:
    """Times with an offset are bucketed by their UTC hour."""
    row = record("exp", "A", HALF, START, user="1")
    row["AssignedAt"] = "2025-11-23T10:30:00+01:00"
    (series,) = report_from_rows([row], generated_at=NOW).series
    assert series.hours == (START,)


# --- pre-aggregated cells (Kusto) and the dict form -------------------------------------------------


def test_cells_from_a_summarised_query_give_the_same_report_as_rows() -> None:
    """Counting summarised cells (what the Kusto query returns) gives the same groups as counting rows."""
    tally = Tally()
    tally.add_cell("exp_skewed", "", "A", parse_split(HALF), START, count=360)
    tally.add_cell("exp_skewed", "", "B", parse_split(HALF), START + timedelta(hours=2), count=240)
    (group,) = build_report(tally, generated_at=NOW).groups
    assert group.chi2 == pytest.approx(24.0)
    assert group.flagged


def test_to_dict_is_json_with_filters_groups_and_series() -> None:
    """to_dict() serialises to JSON: filters, counts, each group's verdict and variants, the series."""
    window = Window(since=START, until=NOW)
    document = json.loads(json.dumps(report_from_rows(monitoring_rows(), window=window, generated_at=NOW).to_dict()))
    assert document["filters"] == {
        "experiment": None,
        "since": "2025-11-23T09:00:00Z",
        "until": "2025-11-23T18:00:00Z",
        "by": "experiment",
    }
    assert document["srm_flagged"] == ["exp_skewed"]
    assert document["assignments_counted"] == 2000
    skewed = next(g for g in document["groups"] if g["experiment"] == "exp_skewed")
    assert skewed["verdict"] == "SRM! p=9.6e-07"
    assert skewed["variants"][0] == {
        "variant": "A",
        "expected_share": 0.5,
        "expected": 300.0,
        "observed": 360,
        "observed_share": 0.6,
    }
    assert document["series"][0]["hours"][0] == "2025-11-23T09:00:00Z"
    assert document["dead_letters"] is None


def test_empty_input_gives_an_empty_report_with_a_note() -> None:
    """No rows: no groups, nothing flagged, and a note saying so."""
    report = report_from_rows([], generated_at=NOW)
    assert report.groups == ()
    assert report.notes == ("no assignments matched the filters",)


# --- HTML -------------------------------------------------------------------------------------------


def test_html_escapes_ids_and_explains_the_missing_dead_letters() -> None:
    """Experiment ids are escaped; without dead-letter data the panel says where to find it."""
    rows = make_rows("<b>exp</b>", {"A": 5, "B": 5}, HALF)
    page = render_html(report_from_rows(rows, generated_at=NOW), source="rows.jsonl")
    assert "<b>exp</b>" not in page
    assert "&lt;b&gt;exp&lt;/b&gt;" in page
    assert "This source has no dead-letter data" in page
    assert page.count("<svg") == 2


def test_html_draws_dead_letters_by_reason() -> None:
    """With dead-letter counts the panel is a bar per reason."""
    tally = Tally()
    tally.add_cell("exp", "", "A", parse_split(HALF), START, count=1)
    tally.add_cell("exp", "", "B", parse_split(HALF), START, count=1)
    report = build_report(tally, generated_at=NOW, dead_letters={"InvalidJson": 3, "UnknownExperiment": 1})
    page = render_html(report)
    assert 'class="deadletters"' in page
    assert "InvalidJson" in page


def test_page_is_self_contained() -> None:
    """No script, stylesheet, image or font is loaded from anywhere, and a policy forbids fetching any."""
    page = render_html(report_from_rows(monitoring_rows(), generated_at=NOW))
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page
    assert "url(" not in page
    assert "default-src 'none'" in page


def test_html_draws_a_single_hour_as_a_bar_per_variant() -> None:
    """All rows in one hour (a demo run): a bar per variant, as tall as its count, and the hour named once."""
    rows = make_rows("exp_demo", {"A": 59, "B": 86}, HALF, hours=0)
    page = render_html(report_from_rows(rows, generated_at=NOW))
    (chart,) = re.findall(r'<svg class="timeseries".*?</svg>', page)
    bars = {
        variant: (int(count), float(height))
        for variant, count, height in re.findall(
            r'class="hour-bar" data-variant="([^"]+)" data-count="(\d+)"[^>]*height="([\d.]+)"', chart
        )
    }
    assert {variant: count for variant, (count, _) in bars.items()} == {"A": 59, "B": 86}
    assert bars["A"][1] / bars["B"][1] == pytest.approx(59 / 86, rel=0.01)
    assert "<polyline" not in chart, "a line over one hour is a single point"
    assert "all assignments in one hour: 2025-11-23 09:00 (UTC)" in chart
