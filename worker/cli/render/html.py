"""A :class:`~worker.domain.srm.report.Report` as one self-contained HTML page: inline CSS, inline SVG, no script.

Nothing is fetched when the page opens (no fonts, scripts or images from elsewhere), so it can be
mailed, attached to an incident or opened on an air-gapped machine. Charts are drawn here as SVG:
assignments per variant per hour, and each variant's observed share against its target.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from worker.domain.moments import utc_iso
from worker.domain.srm.format import format_p, format_split
from worker.domain.srm.report import GroupResult, Report, Series
from worker.domain.srm.tally import BEFORE_ALLOCATION

#: Distinguishable on white and for the common colour-vision deficiencies (Okabe–Ito, then greys).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999")

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       margin: 0; background: #f6f7f9; }
header, main { max-width: 1200px; margin: 0 auto; padding: 16px 24px; }
header { background: #fff; border-bottom: 1px solid #d8dde3; max-width: none; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; }
h3 { font-size: 16px; margin: 0 0 8px; }
.meta { color: #57606a; }
.banner { margin: 12px 0 0; padding: 12px 16px; border-radius: 6px; font-weight: 600; }
.banner.srm { background: #ffebe9; color: #a40e26; border: 2px solid #cf222e; font-size: 17px; }
.banner.ok { background: #dafbe1; color: #116329; border: 1px solid #4ac26b; }
.banner.untested { background: #fff8c5; color: #6f4e00; border: 1px solid #d4a72c; }
.card { background: #fff; border: 1px solid #d8dde3; border-radius: 8px; padding: 16px; margin: 0 0 16px; }
.card.flagged { border: 2px solid #cf222e; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e4e7eb; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
th { background: #eef1f4; font-weight: 600; }
td.verdict { font-weight: 700; text-align: left; }
tr.srm-flag td { background: #fff0ef; }
tr.srm-flag td.verdict { color: #cf222e; }
tr.not-counted td { color: #57606a; background: #f6f7f9; }
td.verdict.ok { color: #116329; }
.note { color: #57606a; font-size: 13px; margin: 6px 0 0; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 4px;
            vertical-align: -1px; }
svg text { font: 11px system-ui, sans-serif; fill: #57606a; }
svg .label { fill: #1b1f24; font-size: 12px; }
"""


def render_html(report: Report, *, source: str = "") -> str:
    """The whole page for ``report``; ``source`` says where the rows came from (shown in the header)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Forbid every fetch: the page must render from its own bytes alone.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        "<title>Assignment report</title>",
        f"<style>{_CSS}</style></head><body>",
        _header(report, source),
        "<main>",
        _srm_section(report),
        _reasons_section(report),
        _experiments_section(report),
        _dead_letters_section(report),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _header(report: Report, source: str) -> str:
    window = report.window
    filters = [
        f"experiment {escape(window.experiment)}" if window.experiment else "all experiments",
        f"since {utc_iso(window.since)}" if window.since else "",
        f"until {utc_iso(window.until)}" if window.until else "",
        "by segment" if report.by_segment else "",
    ]
    counts = escape(report.counts_text)
    return (
        "<header><h1>Assignment report</h1>"
        f'<div class="meta">Generated {utc_iso(report.generated_at)}'
        f"{' from ' + escape(source) if source else ''} · {', '.join(f for f in filters if f)}</div>"
        f'<div class="meta">{counts}</div>{_banner(report)}</header>'
    )


def _banner(report: Report) -> str:
    flagged = report.flagged
    if flagged:
        names = ", ".join(f"{escape(g.label)} ({escape(format_p(g.p_value or 0.0))})" for g in flagged)
        return (
            f'<div class="banner srm" id="srm-banner">SAMPLE RATIO MISMATCH in {len(flagged)} of'
            f" {len(report.groups)}: {names}. Do not read these results until the cause is found.</div>"
        )
    if not report.groups:
        return '<div class="banner ok">No assignments matched the filters.</div>'
    untested = report.untested
    if len(untested) == len(report.groups):
        return (
            '<div class="banner untested">Nothing tested: no group had anything to test'
            f" ({escape(', '.join(g.label for g in untested))}; see the notes below the table).</div>"
        )
    if untested:
        return (
            f'<div class="banner ok">No sample ratio mismatch in the {len(report.groups) - len(untested)} tested'
            f" (chi-square, p &ge; {report.threshold:g}); not tested: {escape(', '.join(g.label for g in untested))}"
            " (see the notes below the table)."
            "</div>"
        )
    return (
        f'<div class="banner ok">No sample ratio mismatch: every split is consistent with its configuration'
        f" (chi-square, p &ge; {report.threshold:g}).</div>"
    )


# --- SRM table ------------------------------------------------------------------------------------


def _srm_section(report: Report) -> str:
    head = (
        '<tr><th class="text">experiment</th><th class="text">variant</th><th>target share</th><th>expected</th>'
        '<th>observed</th><th>observed share</th><th>chi²</th><th>p</th><th class="text">verdict</th></tr>'
    )
    body = "".join(_srm_rows(group) for group in report.groups)
    notes = "".join(
        f'<p class="note"><b>{escape(group.label)}:</b> {escape(note)}</p>'
        for group in report.groups
        for note in group.notes
    )
    return (
        '<h2>Sample-ratio mismatch</h2><table id="srm-table"><thead>'
        f"{head}</thead><tbody>{body}</tbody></table>{notes}"
        f'<p class="note">Pearson chi-square of observed counts against the configured split; flagged when p &lt;'
        f" {report.threshold:g}. Rows are deduplicated by EventId. Only assignments in the experiment are counted;"
        " the others are listed by reason below.</p>"
    )


# --- assignments by reason ------------------------------------------------------------------------


def _reasons_section(report: Report) -> str:
    """Every experiment's rows by reason: counted (in the experiment) or served outside it, per variant."""
    heading = "<h2>Assignments by reason</h2>"
    if not report.allocations:
        return ""
    head = (
        '<tr><th class="text">experiment</th><th class="text">reason</th><th class="text">counted</th>'
        '<th>assignments</th><th class="text">variants served</th></tr>'
    )
    rows = []
    for allocation in report.allocations:
        for r in allocation.reasons:
            variants = ", ".join(f"{variant} {n:,}" for variant, n in r.variants)
            rows.append(
                f'<tr class="{"counted" if r.in_experiment else "not-counted"}"'
                f' data-experiment="{escape(allocation.experiment)}" data-reason="{escape(r.reason)}">'
                f'<td class="text">{escape(allocation.experiment)}</td><td class="text">{escape(r.reason)}</td>'
                f'<td class="text">{"yes" if r.in_experiment else "no"}</td><td>{r.total:,}</td>'
                f'<td class="text">{escape(variants)}</td></tr>'
            )
    return (
        f'{heading}<table id="reasons-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
        '<p class="note">Overridden, draft, stopped, launched, scheduled-out, targeted-out, held-out, other-layer'
        " and not-yet-ramped users are served a variant but are not in the experiment: the SRM test never counts"
        f" them. {escape(BEFORE_ALLOCATION)}: rows written before allocation, counted as in the experiment.</p>"
    )


def _srm_rows(group: GroupResult) -> str:
    css = "srm-flag" if group.flagged else ""
    verdict_css = "verdict" if group.flagged else "verdict ok"
    if not group.variants:
        # Nothing in the experiment to test: one row that says so (the note below says why).
        return (
            f'<tr class="untested" data-experiment="{escape(group.label)}" data-verdict="{escape(group.verdict)}">'
            f'<td class="text">{escape(group.label)}<br><small>n=0</small></td>'
            '<td class="text" colspan="7">no in-experiment assignments to test</td>'
            f'<td class="verdict">{escape(group.verdict)}</td></tr>'
        )
    rows = []
    for index, v in enumerate(group.variants):
        first = index == 0
        span = len(group.variants)
        lead = f'<td class="text" rowspan="{span}">{escape(group.label)}<br><small>n={group.total:,}</small></td>'
        tail = (
            f'<td rowspan="{span}">{"" if group.chi2 is None else f"{group.chi2:.2f}"}</td>'
            f'<td rowspan="{span}">{"" if group.p_value is None else escape(format_p(group.p_value))}</td>'
            f'<td class="{verdict_css}" rowspan="{span}">{escape(group.verdict)}</td>'
        )
        rows.append(
            f'<tr class="{css}" data-experiment="{escape(group.label)}" data-verdict="{escape(group.verdict)}">'
            f'{lead if first else ""}<td class="text">{escape(v.variant)}</td>'
            f"<td>{v.expected_share:.1%}</td><td>{v.expected:,.1f}</td><td>{v.observed:,}</td>"
            f"<td>{v.observed_share:.1%}</td>{tail if first else ''}</tr>"
        )
    return "".join(rows)


# --- per experiment: time series and share bars ---------------------------------------------------


def _experiments_section(report: Report) -> str:
    cards = []
    for series in report.series:
        groups = [g for g in report.groups if g.experiment == series.experiment]
        colours = {variant: PALETTE[i % len(PALETTE)] for i, variant in enumerate(series.counts)}
        flagged = any(g.flagged for g in groups)
        bars = "".join(share_bars(group, colours) for group in groups)
        cards.append(
            f'<section class="card{" flagged" if flagged else ""}" data-experiment="{escape(series.experiment)}">'
            f"<h3>{escape(series.experiment)}</h3>{_legend(colours)}"
            f'<div class="charts">{timeseries_chart(series, colours)}<div>{bars}</div></div></section>'
        )
    return "<h2>In-experiment assignments per experiment and variant</h2>" + (
        "".join(cards) or '<p class="note">No data.</p>'
    )


def _legend(colours: dict[str, str]) -> str:
    items = "".join(f'<span><i style="background:{c}"></i>{escape(v)}</span>' for v, c in colours.items())
    return f'<div class="legend">{items}</div>'


def timeseries_chart(series: Series, colours: dict[str, str], *, width: int = 620, height: int = 240) -> str:
    """Assignments per UTC hour, one line per variant, as an inline SVG (one bar per variant for a single hour)."""
    if len(series.hours) == 1:
        return _one_hour_chart(series, colours, width=width, height=height)
    left, right, top, bottom = 48, 12, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((max(counts) for counts in series.counts.values() if counts), default=0) or 1
    steps = max(len(series.hours) - 1, 1)

    def x(index: int) -> float:
        return left + (plot_w * index / steps if len(series.hours) > 1 else plot_w / 2)

    def y(count: int) -> float:
        return top + plot_h - plot_h * count / peak

    shapes = [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#8c959f"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#8c959f"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak:,}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
        f'<text x="{left}" y="{height - 18}">{escape(_hour_label(series.hours[0]))}</text>',
        f'<text x="{left + plot_w}" y="{height - 18}" text-anchor="end">{escape(_hour_label(series.hours[-1]))}</text>',
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">assignments per hour (UTC)</text>',
    ]
    dots = len(series.hours) <= 96
    for variant, counts in series.counts.items():
        colour = colours[variant]
        points = " ".join(f"{x(i):.1f},{y(c):.1f}" for i, c in enumerate(counts))
        shapes.append(
            f'<polyline class="series" data-variant="{escape(variant)}" fill="none" stroke="{colour}"'
            f' stroke-width="2" points="{points}"/>'
        )
        if dots:
            shapes += [f'<circle cx="{x(i):.1f}" cy="{y(c):.1f}" r="3" fill="{colour}"/>' for i, c in enumerate(counts)]
    title = f"Assignments per hour, {series.experiment}"
    return _svg("timeseries", title, width, height, shapes)


def _one_hour_chart(series: Series, colours: dict[str, str], *, width: int, height: int) -> str:
    """Every assignment in one hour (a demo run, a short window): a bar per variant with its count.

    A line needs two hours; drawn over one it is a single point, and the hour would label both ends of the axis.
    """
    left, right, top, bottom = 48, 12, 24, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = {variant: counts[0] for variant, counts in series.counts.items()}
    peak = max(totals.values(), default=0) or 1
    slot = plot_w / max(len(totals), 1)
    bar_w = min(64.0, slot * 0.6)
    hour = _hour_label(series.hours[0])
    shapes = [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#8c959f"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">'
        f"all assignments in one hour: {escape(hour)} (UTC)</text>",
    ]
    for index, (variant, count) in enumerate(totals.items()):
        middle = left + slot * (index + 0.5)
        bar_h = max(plot_h * count / peak, 1.0)
        shapes += [
            f'<rect class="hour-bar" data-variant="{escape(variant)}" data-count="{count}" x="{middle - bar_w / 2:.1f}"'
            f' y="{top + plot_h - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" fill="{colours[variant]}"/>',
            f'<text class="label" x="{middle:.1f}" y="{top + plot_h - bar_h - 6:.1f}"'
            f' text-anchor="middle">{count:,}</text>',
            f'<text x="{middle:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{escape(_clip(variant))}</text>',
        ]
    return _svg("timeseries", f"Assignments in the hour {hour} UTC, {series.experiment}", width, height, shapes)


def share_bars(group: GroupResult, colours: dict[str, str], *, width: int = 520) -> str:
    """Each variant's observed share as a bar, with a black tick at its target share."""
    label_w, bar_w, row_h, top = 110, width - 110 - 150, 26, 24
    height = top + row_h * len(group.variants) + 8
    heading = f"{group.label}: {group.verdict}"
    shapes = [f'<text class="label" x="0" y="14">{escape(heading)}</text>']
    for row, v in enumerate(group.variants):
        y = top + row * row_h
        fill = "#cf222e" if group.flagged else colours.get(v.variant, PALETTE[-1])
        target_x = label_w + bar_w * v.expected_share
        shapes += [
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(_clip(v.variant))}</text>',
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="16" fill="#eef1f4"/>',
            f'<rect class="share" data-variant="{escape(v.variant)}" x="{label_w}" y="{y + 3}"'
            f' width="{max(bar_w * v.observed_share, 1.0):.1f}" height="16" fill="{fill}"/>',
            f'<line class="target" x1="{target_x:.1f}" y1="{y}" x2="{target_x:.1f}" y2="{y + 22}"'
            ' stroke="#1b1f24" stroke-width="2"/>',
            f'<text x="{label_w + bar_w + 8}" y="{y + 15}">'
            f"{v.observed_share:.1%} (target {v.expected_share:.1%})</text>",
        ]
    split = f"{group.label}: observed share against target ({format_split(group.latest_split)})"
    return _svg("shares", split, width, height, shapes)


def _svg(kind: str, title: str, width: int, height: int, shapes: Sequence[str]) -> str:
    return (
        f'<svg class="{kind}" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}"><title>{escape(title)}</title>{"".join(shapes)}</svg>'
    )


def _hour_label(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:00")


def _clip(text: str, limit: int = 16) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- dead letters ---------------------------------------------------------------------------------


def _dead_letters_section(report: Report) -> str:
    heading = "<h2>Dead letters by reason</h2>"
    if report.dead_letters is None:
        return (
            f'{heading}<div class="card" id="dead-letters"><p class="note">This source has no dead-letter data:'
            " assignment rows record only requests that succeeded. Pass <code>--dead-letters FILE</code> (what"
            " <code>ab-worker run --dead-letters</code> or <code>ab-worker dlq export</code> writes), or see the"
            " workbook's dead-letter panel, which reads <code>ab.dead_letters</code> from Application"
            " Insights.</p></div>"
        )
    if not report.dead_letters:
        return f'{heading}<div class="card" id="dead-letters"><p class="note">No dead letters.</p></div>'
    peak = max(report.dead_letters.values())
    label_w, bar_w, row_h = 220, 520, 26
    shapes = []
    for row, (reason, count) in enumerate(report.dead_letters.items()):
        y = row * row_h
        shapes += [
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(reason)}</text>',
            f'<rect x="{label_w}" y="{y + 3}" width="{max(bar_w * count / peak, 1.0):.1f}" height="16"'
            ' fill="#D55E00"/>',
            f'<text x="{label_w + bar_w + 8}" y="{y + 15}">{count:,}</text>',
        ]
    chart = _svg(
        "deadletters", "Dead letters by reason", label_w + bar_w + 80, row_h * len(report.dead_letters), shapes
    )
    return f'{heading}<div class="card" id="dead-letters">{chart}</div>'
