"""Cohort results as text: the segment × arm balance table, the checks, and a test plan."""

from __future__ import annotations

from collections.abc import Sequence

from worker.domain.cohort.balance import BalanceReport
from worker.domain.plural import counted
from worker.domain.srm.stats import ExperimentPlan


def render_table(report: BalanceReport) -> list[str]:
    """The segment × arm table with totals and shares, as a Markdown table."""
    table = report.table
    header = ["Segment", *table.arms, "Total"]
    body = [
        [segment, *(str(table.counts[segment][a]) for a in table.arms), str(table.row_totals[segment])]
        for segment in table.segments
    ]
    body.append(["Total", *(str(table.column_totals[a]) for a in table.arms), str(table.total)])
    total = max(table.total, 1)
    body.append(["Share", *(f"{table.column_totals[a] / total:.1%}" for a in table.arms), "100.0%"])
    body.append(["Target", *(f"{float(report.target_shares[a]):.1%}" for a in table.arms), "100.0%"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *(line(row) for row in body)]


def render_checks(report: BalanceReport) -> list[str]:
    """One ``PASS``/``FAIL`` line per check."""
    return [f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in report.checks]


def render_plan(plan: ExperimentPlan) -> list[str]:
    """The plan as text: the test, the MDE at the given size, and the size for the given lift."""
    treatments = plan.arms - 1
    correction = (
        f"Bonferroni: alpha {plan.alpha:g} / {treatments} = {plan.alpha_per_comparison:.4g} per comparison"
        if plan.bonferroni
        else f"no multiple-comparison correction (--bonferroni tests each at alpha/{treatments})"
    )
    compared = "the treatment" if treatments == 1 else f"each of {counted(treatments, 'treatment')}"
    lines = [
        f"Two-sided two-proportion z-test, {compared} against control;",
        f"alpha {plan.alpha:g}, {correction}; power {plan.power:g}.",
        "Normal approximation, pooled variance under H0 and unpooled under H1 (Fleiss);",
        "the MDE solves that equation exactly.",
        "",
    ]
    p1 = plan.baseline
    if plan.per_arm is not None:
        lines.append(f"With {plan.per_arm:,} per arm ({plan.per_arm * plan.arms:,} in all), baseline {p1:.2%}:")
        if plan.mde is None:
            lines.append("  minimum detectable effect: none; no rate up to 100% is detectable")
        else:
            mde = plan.mde
            lines += [
                f"  minimum detectable effect: {mde.absolute:+.2%} absolute"
                f" ({p1:.2%} -> {mde.treatment_rate:.2%}), {mde.relative:+.1%} relative",
                f"  (the pooled shortcut (z_a+z_b)*sqrt(2p(1-p)/n) would say {mde.shortcut_absolute:+.2%}"
                f" absolute, {mde.shortcut_absolute / p1:+.1%} relative)",
            ]
        lines.append(
            f"  power to detect a {plan.lift:.1%} relative lift ({p1:.2%} -> {plan.lift_rate:.2%}):"
            f" {plan.power_at_lift or 0.0:.1%}"
        )
        lines.append("")
    lines.append(f"For a {plan.lift:.1%} relative lift ({p1:.2%} -> {plan.lift_rate:.2%}) at power {plan.power:g}:")
    lines.append(
        f"  sample size: {plan.sample_size_for_lift:,} per arm,"
        f" {plan.sample_size_for_lift * plan.arms:,} across {counted(plan.arms, 'arm')}"
    )
    return lines
