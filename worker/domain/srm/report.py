"""Sample-ratio monitoring: are the recorded assignments split the way the experiments are configured?

Pure: rows (dicts with the :class:`~schemas.models.AssignmentRecord` columns) or pre-aggregated
cells (what the Kusto query returns) go in, a :class:`Report` comes out; reading files, querying
Kusto, printing and HTML live elsewhere (``worker.cli.report``, ``adapters.kusto.query``,
``worker.cli.render.html``).

Counting (deduplication, filters, hourly buckets) is :mod:`worker.domain.srm.tally`'s; this module
tests what was counted. Per experiment — or per experiment × segment — observed counts per variant
are tested against the configured split with :func:`worker.domain.srm.stats.srm_test` (Pearson
chi-square; flagged below p = 0.001); :mod:`worker.domain.srm.format` prints the numbers.

The expected count of a variant is the sum, over the rows, of the share that row's own
``SplitRatio`` gives it under the assignment rule (:func:`assigned_shares`: the last variant takes
any leftover of a split summing to slightly under 1, exactly as assignment does). With one split
this is ``total × share``, the textbook test. When rows carry different splits — segment
overrides, or a configuration change mid-experiment — it is still the exact expectation under "the
assignment rule worked", where testing every row against the most recent split would flag a
healthy experiment whose split was merely changed. A note names the splits seen and the most recent
one.

Only assignments **in** the experiment are tested (``InExperiment``; a row written before allocation
counts as in it). Users who were overridden, launched, held out, targeted away and so on were served a
variant but are not part of the comparison: counting 500 QA users forced onto one arm would flag a
healthy experiment. They are reported beside it, per experiment and reason (:class:`Allocation`), and
an experiment whose rows are all outside it gets a group that says so instead of vanishing.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker.domain.assignment import VariantTable
from worker.domain.moments import utc_iso
from worker.domain.plural import counted
from worker.domain.srm.format import format_p, format_split
from worker.domain.srm.stats import SRM_THRESHOLD, StatsInputError, srm_test
from worker.domain.srm.tally import BEFORE_ALLOCATION, Seen, Split, Tally, Window, tally_rows

# --- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VariantCount:
    """One variant of one group: its expected share and count, and what was observed."""

    variant: str
    expected_share: float
    expected: float
    observed: int
    observed_share: float


@dataclass(frozen=True, slots=True)
class GroupResult:
    """The SRM test of one experiment (or one experiment × segment with ``--by segment``)."""

    experiment: str
    #: ``None`` unless the report is by segment; ``""`` is the rows with no segment.
    segment: str | None
    total: int
    variants: tuple[VariantCount, ...]
    chi2: float | None
    dof: int
    p_value: float | None
    flagged: bool
    #: The most recent split seen in the group's rows.
    latest_split: Split
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``exp`` or ``exp / segment`` (``(no segment)`` for rows without one)."""
        if self.segment is None:
            return self.experiment
        return f"{self.experiment} / {self.segment or '(no segment)'}"

    @property
    def verdict(self) -> str:
        """``OK``, ``SRM! p=…`` when flagged, or ``n/a`` when there is nothing to test."""
        if self.p_value is None:
            return "n/a"
        return f"SRM! {format_p(self.p_value)}" if self.flagged else "OK"


@dataclass(frozen=True, slots=True)
class ReasonCount:
    """Rows of one experiment decided for one reason: counted in the test (``in_experiment``) or not."""

    reason: str
    in_experiment: bool
    total: int
    #: Rows per variant served, in variant order.
    variants: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Configuration:
    """Counted rows of one experiment decided under one ``config_version`` (``""``: before allocation)."""

    config_version: str
    rows: int
    first_seen: datetime | None
    last_seen: datetime | None

    @property
    def label(self) -> str:
        """The digest, or :data:`~worker.domain.srm.tally.BEFORE_ALLOCATION` for rows without one."""
        return self.config_version or BEFORE_ALLOCATION


@dataclass(frozen=True, slots=True)
class Allocation:
    """One experiment's rows in the window by reason, and the configurations that decided the counted ones."""

    experiment: str
    #: Counted reasons first, then the others, each by descending rows.
    reasons: tuple[ReasonCount, ...]
    #: In order of first appearance.
    configurations: tuple[Configuration, ...]

    @property
    def counted(self) -> int:
        """Rows in the experiment (what the SRM test reads)."""
        return sum(r.total for r in self.reasons if r.in_experiment)

    @property
    def not_counted(self) -> int:
        """Rows served outside the experiment (never tested)."""
        return sum(r.total for r in self.reasons if not r.in_experiment)

    @property
    def outside(self) -> tuple[ReasonCount, ...]:
        """The reasons that kept rows out of the experiment."""
        return tuple(r for r in self.reasons if not r.in_experiment)


@dataclass(frozen=True, slots=True)
class Series:
    """Assignments of one experiment per variant per UTC hour, every hour from first to last."""

    experiment: str
    hours: tuple[datetime, ...]
    counts: dict[str, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Report:
    """Everything ``ab-worker report`` prints, emits as JSON or renders as HTML."""

    generated_at: datetime
    window: Window
    by_segment: bool
    rows_read: int
    duplicates: int
    excluded: int
    groups: tuple[GroupResult, ...]
    series: tuple[Series, ...]
    #: Dead letters by reason, or ``None`` when the source has none to offer.
    dead_letters: dict[str, int] | None = None
    threshold: float = SRM_THRESHOLD
    notes: tuple[str, ...] = field(default=())
    #: Per experiment: rows by reason, counted or not, and the configurations behind the counted ones.
    allocations: tuple[Allocation, ...] = ()

    @property
    def flagged(self) -> tuple[GroupResult, ...]:
        """The groups with a sample-ratio mismatch."""
        return tuple(group for group in self.groups if group.flagged)

    @property
    def untested(self) -> tuple[GroupResult, ...]:
        """The groups with nothing to test (every row outside the experiment, or no usable split)."""
        return tuple(group for group in self.groups if group.p_value is None)

    @property
    def counted(self) -> int:
        """Assignments counted (in the experiment, after deduplication and filters)."""
        return sum(group.total for group in self.groups)

    @property
    def not_counted(self) -> int:
        """Assignments in the window served outside their experiment (not tested)."""
        return sum(allocation.not_counted for allocation in self.allocations)

    @property
    def counts_text(self) -> str:
        """``N assignments counted from M rows (…)``: what was read, left out of the test, dropped and filtered."""
        outside = f"{self.not_counted:,} not in the experiment, " if self.not_counted else ""
        return (
            f"{counted(self.counted, 'assignment', thousands=True)} counted"
            f" from {counted(self.rows_read, 'row', thousands=True)}"
            f" ({outside}{self.duplicates:,} duplicate EventIds dropped, {self.excluded:,} outside the filters)"
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: times as ISO 8601 UTC text, splits as objects."""
        return {
            "generated_at": utc_iso(self.generated_at),
            "filters": {
                "experiment": self.window.experiment,
                "since": None if self.window.since is None else utc_iso(self.window.since),
                "until": None if self.window.until is None else utc_iso(self.window.until),
                "by": "segment" if self.by_segment else "experiment",
            },
            "rows_read": self.rows_read,
            "duplicates_dropped": self.duplicates,
            "excluded_by_filters": self.excluded,
            "assignments_counted": self.counted,
            "not_in_experiment": self.not_counted,
            "srm_threshold": self.threshold,
            "srm_flagged": [group.label for group in self.flagged],
            "groups": [_group_dict(group) for group in self.groups],
            "series": [
                {
                    "experiment": s.experiment,
                    "hours": [utc_iso(hour) for hour in s.hours],
                    "counts": {variant: list(counts) for variant, counts in s.counts.items()},
                }
                for s in self.series
            ],
            "dead_letters": self.dead_letters,
            "experiments": [_allocation_dict(allocation) for allocation in self.allocations],
            "notes": list(self.notes),
        }


def _allocation_dict(allocation: Allocation) -> dict[str, object]:
    return {
        "experiment": allocation.experiment,
        "in_experiment": allocation.counted,
        "not_in_experiment": allocation.not_counted,
        "reasons": [
            {"reason": r.reason, "in_experiment": r.in_experiment, "assignments": r.total, "variants": dict(r.variants)}
            for r in allocation.reasons
        ],
        "config_versions": [
            {
                "config_version": c.config_version or None,
                "assignments": c.rows,
                "first_seen": None if c.first_seen is None else utc_iso(c.first_seen),
                "last_seen": None if c.last_seen is None else utc_iso(c.last_seen),
            }
            for c in allocation.configurations
        ],
    }


def _group_dict(group: GroupResult) -> dict[str, object]:
    return {
        "experiment": group.experiment,
        "segment": group.segment,
        "total": group.total,
        "verdict": group.verdict,
        "flagged": group.flagged,
        "chi2": group.chi2,
        "dof": group.dof,
        "p_value": group.p_value,
        "latest_split": dict(group.latest_split),
        "variants": [
            {
                "variant": v.variant,
                "expected_share": v.expected_share,
                "expected": v.expected,
                "observed": v.observed,
                "observed_share": v.observed_share,
            }
            for v in group.variants
        ],
        "notes": list(group.notes),
    }


@functools.lru_cache(maxsize=1024)
def assigned_shares(split: Split) -> Split:
    """The shares the assignment rule really gives each variant of ``split``.

    Not the ratios normalised: a split summing to 0.99 (accepted) leaves its last variant the
    leftover bucket range, so ``A=0.5,B=0.49`` assigns half the users to each arm. Expecting
    0.505/0.495 instead raised a false SRM alarm (p = 1e-5 on 200,000 assignments).
    """
    return tuple(sorted(VariantTable(dict(split)).shares().items()))


@dataclass(slots=True)
class _Group:
    observed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    weight: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    splits: dict[Split, tuple[int, datetime | None]] = field(default_factory=dict)

    def add(self, variant: str, split: Split, count: int, last_seen: datetime | None) -> None:
        self.observed[variant] += count
        for arm, share in assigned_shares(split):
            self.weight[arm] += count * share
        rows, seen = self.splits.get(split, (0, None))
        latest = last_seen if seen is None or (last_seen is not None and last_seen > seen) else seen
        self.splits[split] = (rows + count, latest)


def build_report(
    tally: Tally,
    *,
    by_segment: bool = False,
    generated_at: datetime,
    dead_letters: Mapping[str, int] | None = None,
    threshold: float = SRM_THRESHOLD,
) -> Report:
    """Test every group in ``tally`` for a sample-ratio mismatch and build the hourly series."""
    groups: dict[tuple[str, str | None], _Group] = defaultdict(_Group)
    hourly: dict[str, dict[str, dict[datetime, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for (experiment, segment, variant, split, hour), count, last_seen in tally.cells():
        groups[(experiment, segment if by_segment else None)].add(variant, split, count, last_seen)
        hourly[experiment][variant][hour] += count
    allocations = _allocations(tally)
    tested = {experiment for experiment, _ in groups}
    results = tuple(
        sorted(
            [
                *(
                    _test_group(experiment, segment, group, threshold)
                    for (experiment, segment), group in groups.items()
                ),
                *(_nothing_to_test(a) for a in allocations if a.experiment not in tested),
            ],
            key=lambda group: (group.experiment, group.segment or ""),
        )
    )
    series = tuple(_series(experiment, hourly[experiment]) for experiment in sorted(hourly))
    notes = [] if results else ["no assignments matched the filters"]
    for allocation in allocations:
        notes += _configuration_notes(allocation)
    return Report(
        generated_at=generated_at,
        window=tally.window,
        by_segment=by_segment,
        rows_read=tally.rows_read,
        duplicates=tally.duplicates,
        excluded=tally.excluded,
        groups=results,
        series=series,
        dead_letters=None if dead_letters is None else dict(sorted(dead_letters.items())),
        threshold=threshold,
        notes=tuple(notes),
        allocations=allocations,
    )


def _allocations(tally: Tally) -> tuple[Allocation, ...]:
    reasons: dict[str, list[ReasonCount]] = defaultdict(list)
    for (experiment, inside, reason), variants in tally.reasons.items():
        counts = tuple(sorted((variant, n) for variant, n in variants.items() if n))
        if counts:
            reasons[experiment].append(ReasonCount(reason, inside, sum(n for _, n in counts), counts))
    return tuple(
        Allocation(
            experiment,
            tuple(sorted(reasons[experiment], key=lambda r: (not r.in_experiment, -r.total, r.reason))),
            _configurations(tally.configurations.get(experiment, {})),
        )
        for experiment in sorted(reasons)
    )


def _configurations(seen: Mapping[str, Seen]) -> tuple[Configuration, ...]:
    epoch = datetime.min.replace(tzinfo=UTC)
    found = [Configuration(version, s.count, s.first, s.last) for version, s in seen.items() if s.count]
    return tuple(sorted(found, key=lambda c: (c.first_seen or epoch, c.config_version)))


def _configuration_notes(allocation: Allocation) -> list[str]:
    """A note when the counted rows of one experiment were decided under more than one configuration."""
    if len(allocation.configurations) < 2:
        return []
    spans = "; ".join(
        f"{c.label} ({counted(c.rows, 'row', thousands=True)}"
        + (f", {utc_iso(c.first_seen)} to {utc_iso(c.last_seen)}" if c.first_seen and c.last_seen else "")
        + ")"
        for c in allocation.configurations
    )
    return [
        f"{allocation.experiment}: the counted rows were decided under {len(allocation.configurations)} configurations"
        f" (config_version): {spans}. A ramp, a lifecycle change or new overrides each change it; check that the"
        " change was meant before reading results across it."
    ]


def describe_outside(allocation: Allocation) -> str:
    """``500 override (B 500); 20 stopped (A 20)``: the rows kept out of the experiment, by reason and variant."""
    return "; ".join(
        f"{r.total:,} {r.reason} ({', '.join(f'{variant} {n:,}' for variant, n in r.variants)})"
        for r in allocation.outside
    )


def _nothing_to_test(allocation: Allocation) -> GroupResult:
    """The group of an experiment whose rows in the window are all outside it: said, not silently dropped."""
    outside = (
        "the one assignment is"
        if allocation.not_counted == 1
        else f"all {counted(allocation.not_counted, 'assignment', thousands=True)} are"
    )
    note = (
        f"nothing to test: {outside} outside the experiment"
        f" ({describe_outside(allocation)}); only in-experiment assignments are tested"
    )
    return GroupResult(allocation.experiment, None, 0, (), None, 0, None, False, (), (note,))


def report_from_rows(
    rows: Iterable[Mapping[str, object]],
    *,
    window: Window | None = None,
    by_segment: bool = False,
    generated_at: datetime,
) -> Report:
    """:func:`tally_rows` then :func:`build_report`: the whole pure pipeline in one call."""
    return build_report(tally_rows(rows, window), by_segment=by_segment, generated_at=generated_at)


def _latest_split(group: _Group) -> Split:
    epoch = datetime.min.replace(tzinfo=UTC)
    return max(group.splits, key=lambda split: (group.splits[split][1] or epoch, group.splits[split][0]))


def _split_notes(group: _Group, latest: Split) -> list[str]:
    if len(group.splits) < 2:
        return []
    seen = "; ".join(
        f"{format_split(split)} ({counted(rows, 'row')})" for split, (rows, _) in sorted(group.splits.items())
    )
    return [
        f"{len(group.splits)} different splits in these rows (segment overrides or a configuration change): {seen}."
        f" Most recent: {format_split(latest)}. Expected counts weight each row by the split it was assigned"
        " under, so a changed split alone does not flag."
    ]


def _test_group(experiment: str, segment: str | None, group: _Group, threshold: float) -> GroupResult:
    latest = _latest_split(group)
    notes = _split_notes(group, latest)
    total = sum(group.observed.values())
    arms = sorted(set(group.observed) | set(group.weight))
    variants = tuple(
        VariantCount(
            variant=arm,
            expected_share=group.weight.get(arm, 0.0) / total,
            expected=group.weight.get(arm, 0.0),
            observed=group.observed.get(arm, 0),
            observed_share=group.observed.get(arm, 0) / total,
        )
        for arm in arms
    )
    stray = [v.variant for v in variants if v.observed and v.expected == 0.0]
    if stray:
        # A row assigned to a variant its own split gives no share: no chi-square needed to call that broken.
        notes.append(
            f"{'variant' if len(stray) == 1 else 'variants'} {', '.join(stray)} observed"
            " but given no share by the split"
        )
        return GroupResult(experiment, segment, total, variants, None, len(arms) - 1, 0.0, True, latest, tuple(notes))
    testable = {v.variant: v for v in variants if v.expected > 0.0}
    try:
        result = srm_test(
            {arm: v.observed for arm, v in testable.items()},
            {arm: v.expected for arm, v in testable.items()},
            threshold=threshold,
        )
    except StatsInputError as error:
        notes.append(f"no SRM test: {error}")
        return GroupResult(experiment, segment, total, variants, None, 0, None, False, latest, tuple(notes))
    return GroupResult(
        experiment,
        segment,
        total,
        variants,
        result.chi2,
        result.dof,
        result.p_value,
        result.flagged,
        latest,
        tuple(notes),
    )


def _series(experiment: str, by_variant: Mapping[str, Mapping[datetime, int]]) -> Series:
    first = min(min(hours) for hours in by_variant.values())
    last = max(max(hours) for hours in by_variant.values())
    steps = int((last - first) / timedelta(hours=1)) + 1
    hours = tuple(first + timedelta(hours=step) for step in range(steps))
    counts = {variant: tuple(by_variant[variant].get(hour, 0) for hour in hours) for variant in sorted(by_variant)}
    return Series(experiment, hours, counts)
