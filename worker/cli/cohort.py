"""``ab-worker stratify`` and ``ab-worker plan``: cohort assignment from a file, and test planning.

``worker.cli`` registers these with :func:`add_commands`. The files are :mod:`worker.cli.cohort_files`'s,
the text :mod:`worker.cli.render.cohort`'s, the rule and the checks the domain's. Exit statuses of
``stratify``: 0 written and balanced, 3 written but a balance check failed, 2 bad input or arguments
(nothing written). ``plan`` exits 0, or 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import TextIO

from worker.cli.cohort_files import assignments_writer, format_for, read_arm_variants, read_cohort, report_writer
from worker.cli.common import ExitStatus, Subcommands, check_output, formatter, integer, report_error, write_files
from worker.cli.render.cohort import render_checks, render_plan, render_table
from worker.domain.allocation import AllocatedExperiment
from worker.domain.cohort.allocation import LEFT_OUT, DecidedMembers, partition
from worker.domain.cohort.arms import Arm
from worker.domain.cohort.balance import DEFAULT_MIN_PER_CELL, DEFAULT_TOLERANCE
from worker.domain.cohort.errors import CohortInputError
from worker.domain.cohort.stratify import DEFAULT_SEED, stratify_columns
from worker.domain.errors import UsageError
from worker.domain.moments import utc_iso
from worker.domain.plural import counted
from worker.domain.srm.stats import ExperimentPlan, StatsInputError, plan_experiment
from worker.service.batch import column_kinds

STRATIFY_EPILOG = """\
Members are grouped by segment, ordered within a segment by
md5("{seed}:{experiment}:{member_id}") (ties by id), and cut into arms in the order
--arms lists them: equal arms get n // k each and the first n % k arms one more;
--weights uses largest-remainder apportionment. The same set of members always gets
the same assignment, whatever the row order.

examples:
  # the seed document's scenario: 250 customers, four equal arms
  ab-worker stratify customers.csv --experiment email-tone-2025 \\
      --arms control,treatment_1,treatment_2,treatment_3 \\
      --out assignments.csv --report report.json

  # a 50/25/25 split, a tone per segment, JSON lines in and out
  ab-worker stratify members.jsonl --experiment exp-7 --arms control,urgent,friendly \\
      --weights 0.5,0.25,0.25 --arm-variants tones.json --id-column user_id \\
      --out assignments.jsonl

  tones.json maps arm -> {segment: variant}:
      {"urgent": {"Standard": "urgent_v2", "New Customer": "urgent_welcome"}}

exit status:
  0  written, every balance check passed
  3  written, but a balance check failed (the report names the cells)
  2  bad input or arguments; every problem listed with file and line; nothing written
"""

PLAN_EPILOG = """\
Normal approximation for a two-sided two-proportion z-test of each treatment against
control: n = (z_a*sqrt(2*pbar*(1-pbar)) + z_b*sqrt(p1*q1 + p2*q2))^2 / (p2 - p1)^2,
pooled variance under H0, unpooled under H1 (Fleiss, no continuity correction).
The MDE solves that equation exactly for p2. No multiple-comparison correction
unless --bonferroni, which tests each of the k-1 comparisons at alpha/(k-1).

examples:
  # what can 62 customers per arm detect on a 25% open rate?
  ab-worker plan --arms 4 --per-arm 62 --baseline 0.25

  # how many per arm for a 15% relative lift, Bonferroni-corrected?
  ab-worker plan --arms 4 --baseline 0.25 --lift 0.15 --bonferroni
"""


# --- the arm options ---------------------------------------------------------------------------


def _parse_arms(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def _parse_weights(text: str) -> tuple[list[Fraction | None], list[str]]:
    """Weights as exact fractions: ``0.25`` is 1/4 and ``1/3`` is accepted too."""
    weights: list[Fraction | None] = []
    problems = []
    for part in text.split(","):
        try:
            weights.append(Fraction(part.strip()))
        except (ValueError, ZeroDivisionError):
            weights.append(None)
            problems.append(f"--weights: {part.strip()!r} is not a number")
    return weights, problems


def build_arms(args: argparse.Namespace) -> list[Arm]:
    """The :class:`Arm` list from ``--arms``, ``--weights`` and ``--arm-variants``."""
    arm_ids = _parse_arms(args.arms)
    problems = [f"--arms: empty arm id at position {i + 1}" for i, a in enumerate(arm_ids) if not a]
    weights: list[Fraction | None] = [None] * len(arm_ids)
    if args.weights is not None:
        weights, weight_problems = _parse_weights(args.weights)
        problems += weight_problems
        if len(weights) != len(arm_ids):
            problems.append(f"--weights: {counted(len(weights), 'weight')} for {counted(len(arm_ids), 'arm')}")
    if problems:
        raise CohortInputError(problems)
    variants = read_arm_variants(args.arm_variants, arm_ids) if args.arm_variants else {}
    return [Arm(arm_id, weight, variants.get(arm_id)) for arm_id, weight in zip(arm_ids, weights, strict=True)]


def _parse_moment(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CohortInputError([f"--assigned-at: {text!r} is not an ISO 8601 timestamp"]) from None
    if moment.utcoffset() is None:
        raise CohortInputError([f"--assigned-at: {text!r} has no time zone; add Z or +00:00"])
    return moment


# --- printing ----------------------------------------------------------------------------------


def _print_problems(error: CohortInputError, limit: int) -> None:
    if len(error.problems) == 1:
        report_error("stratify", f"{error.problems[0]} (nothing was written)")
        return
    lines = [f"{counted(len(error.problems), 'problem')} with the input; nothing was written"]
    lines += [f"  {problem}" for problem in error.problems[:limit]]
    if len(error.problems) > limit:
        lines.append(f"  … and {len(error.problems) - limit} more (raise --max-errors)")
    print("ab-worker stratify: error: " + "\n".join(lines), file=sys.stderr)


def _warn_unknown_segments(arms: Sequence[Arm], segments: set[str]) -> None:
    for arm in arms:
        for segment in sorted(set(arm.variants_by_segment or {}) - segments):
            print(
                f"warning: --arm-variants names segment {segment!r} for arm {arm.id!r},"
                " but no member is in that segment",
                file=sys.stderr,
            )


# --- the commands ------------------------------------------------------------------------------


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path can be written, and they differ: checked before the input is read."""
    try:
        check_output(args.out)
        if args.report is not None:
            check_output(args.report)
    except UsageError as exc:
        raise CohortInputError([str(exc)]) from None
    if args.report is not None and args.report.resolve() == args.out.resolve():
        raise CohortInputError([f"--report {args.report} is the same file as --out"])


def run_stratify(args: argparse.Namespace) -> int:
    """Handler of ``ab-worker stratify``: read, assign, check, write, print; the exit status."""
    try:
        arms = build_arms(args)
        moment = _parse_moment(args.assigned_at) or datetime.now(UTC)
        _check_outputs(args)
        source_format = format_for(args.input, args.format, "input")
        out_format = format_for(args.out, None, "output")
        allocation = _allocation_for(args)
        kinds = (
            None
            if allocation is None or allocation.experiment.targeting is None
            else column_kinds(allocation.experiment)
        )
        cohort = read_cohort(args.input, source_format, args.id_column, args.segment_column, kinds)
        member_ids, segments, decided = cohort.member_ids, cohort.segments, None
        if allocation is not None:
            split = partition(allocation.experiment, member_ids, segments, cohort.contexts, moment)
            member_ids, segments, decided = split.pick(member_ids), split.pick(segments), split.decided
            if not member_ids:
                raise CohortInputError([_nothing_to_stratify(allocation, decided)])
        assignment = stratify_columns(
            member_ids,
            segments,
            arms,
            experiment_id=args.experiment,
            seed=args.seed,
            tolerance=args.tolerance,
            min_per_cell=args.min_per_cell,
            assigned_at=moment,
        )
    except CohortInputError as error:
        _print_problems(error, args.max_errors)
        return ExitStatus.USAGE
    _warn_unknown_segments(arms, set(assignment.report.table.segments))
    section = None if allocation is None or decided is None else allocation.section(decided, len(member_ids), moment)
    outputs: list[tuple[Path, Callable[[TextIO], object]]] = [
        (args.out, assignments_writer(out_format, assignment, decided))
    ]
    if args.report is not None:
        outputs.append((args.report, report_writer(assignment, args.input, section)))
    write_files(outputs)
    report = assignment.report
    print(
        f"Experiment {assignment.experiment_id!r}, seed {assignment.seed!r}:"
        f" {counted(report.table.total, 'member')} in {counted(len(report.table.segments), 'segment')},"
        f" {counted(len(arms), 'arm')}"
    )
    if allocation is not None and decided is not None:
        print(allocation.summary(decided, report.table.total))
    print("\n".join(render_table(report)))
    print()
    print("\n".join(render_checks(report)))
    written = f"Wrote {args.out}" + (f" and {args.report}" if args.report is not None else "")
    print(written + ("." if report.passed else "; a balance check FAILED (exit status 3)."))
    return ExitStatus.OK if report.passed else ExitStatus.UNBALANCED


@dataclass(frozen=True, slots=True)
class _Allocation:
    """The cohort's experiment in the registry: its compiled allocation and the file it came from."""

    experiment: AllocatedExperiment
    version: str
    source: str

    def summary(self, decided: DecidedMembers, stratified: int) -> str:
        """One paragraph: the configuration applied, and the members its steps decided, by reason."""
        experiment = self.experiment
        head = f"Allocation of {experiment.experiment_id} from {self.source} (config {experiment.config_version}):"
        if not decided:
            return (
                f"{head} no member is overridden, outside its lifecycle, targeted away, held out or in another layer."
            )
        reasons = decided.counts_text()
        return (
            f"{head} {len(decided)} of {counted(len(decided) + stratified, 'member')} decided before stratification,"
            f" not in the experiment ({reasons}; listed by reason in the report); the other {stratified} stratified."
            " Coverage does not apply to a cohort."
        )

    def section(self, decided: DecidedMembers, stratified: int, at: datetime) -> dict[str, object]:
        """The report's ``allocation`` section: what was applied, and every decided member by reason."""
        return {
            "experiments_file": self.source,
            "experiment_version": self.version,
            "config_version": self.experiment.config_version,
            "decided_at": utc_iso(at),
            "steps_left_out": sorted(LEFT_OUT),
            "stratified": stratified,
            "decided": len(decided),
            "counts": decided.counts(),
            "members": decided.by_reason(),
        }


def _allocation_for(args: argparse.Namespace) -> _Allocation | None:
    """The experiment's allocation from ``--config`` (else ``AB_WORKER_EXPERIMENTS_FILE``), or ``None``.

    ``None`` when no file is named, when the experiment there uses no allocation step (its cohort is
    stratified exactly as before), or when the environment's file does not configure it (a cohort
    label need not be an experiment: a note says so). An experiment missing from ``--config`` itself
    is an error listing the ones there.
    """
    from worker.bootstrap import ExperimentRegistry, environment_settings

    path = args.config or environment_settings().experiments_file
    if not path:
        return None
    registry = ExperimentRegistry.load(path)
    experiment = registry.get(args.experiment)
    if experiment is None:
        configured = ", ".join(sorted(e.id for e in registry)) or "none"
        if args.config:
            raise CohortInputError([f"--config: experiment {args.experiment!r} is not in {path} (there: {configured})"])
        print(
            f"note: {args.experiment!r} is not in {path} (AB_WORKER_EXPERIMENTS_FILE): stratified without its"
            " allocation steps",
            file=sys.stderr,
        )
        return None
    if experiment.plain:
        return None
    return _Allocation(experiment.allocation, experiment.config.version, str(path))


def _nothing_to_stratify(allocation: _Allocation, decided: DecidedMembers) -> str:
    reasons = decided.counts_text()
    return (
        f"nothing to stratify: the allocation of {allocation.experiment.experiment_id} in {allocation.source}"
        f" decides every member before stratification ({reasons}); check its status, start_at/end_at and targeting"
    )


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``ab-worker plan``: print (or emit as JSON) what the test can detect."""
    try:
        plan = plan_experiment(
            arms=args.arms,
            baseline=args.baseline,
            lift=args.lift,
            per_arm=args.per_arm,
            alpha=args.alpha,
            power=args.power,
            bonferroni=args.bonferroni,
        )
    except StatsInputError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(_plan_dict(plan), indent=2))
    else:
        print("\n".join(render_plan(plan)))
    return ExitStatus.OK


def _plan_dict(plan: ExperimentPlan) -> dict[str, object]:
    mde = plan.mde
    return {
        "arms": plan.arms,
        "baseline": plan.baseline,
        "alpha": plan.alpha,
        "alpha_per_comparison": plan.alpha_per_comparison,
        "bonferroni": plan.bonferroni,
        "power": plan.power,
        "per_arm": plan.per_arm,
        "mde_absolute": None if mde is None else mde.absolute,
        "mde_relative": None if mde is None else mde.relative,
        "mde_treatment_rate": None if mde is None else mde.treatment_rate,
        "mde_shortcut_absolute": None if mde is None else mde.shortcut_absolute,
        "lift": plan.lift,
        "lift_rate": plan.lift_rate,
        "power_at_lift": plan.power_at_lift,
        "sample_size_per_arm_for_lift": plan.sample_size_for_lift,
    }


# --- argument parsing --------------------------------------------------------------------------


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be strictly between 0 and 1")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(Decimal(text))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to 1 (0.05 = 5 percentage points)")
    return value


def _add_stratify(subparsers: Subcommands) -> None:
    parser = subparsers.add_parser(
        "stratify",
        help="assign a cohort file to arms by stratified randomisation, with balance checks",
        description="Assign every member of a cohort file to an arm, stratified by segment, check the\n"
        "balance, write the assignments and print the segment × arm table with PASS/FAIL checks.",
        epilog=STRATIFY_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="cohort file: CSV with a header, or JSON lines")
    parser.add_argument("--experiment", required=True, help="experiment id (part of the hash key)")
    parser.add_argument("--arms", required=True, help="comma-separated arm ids, control first")
    parser.add_argument("--weights", help="comma-separated relative weights, one per arm (default: equal)")
    parser.add_argument(
        "--arm-variants",
        type=Path,
        metavar="FILE.json",
        help="JSON object: arm -> {segment: variant_id}; other cells get the arm id",
    )
    parser.add_argument("--seed", default=str(DEFAULT_SEED), help="hash seed (default: %(default)s)")
    parser.add_argument(
        "--config",
        help="experiments file: apply the experiment's overrides, lifecycle, targeting, holdouts and layer first"
        " (default: AB_WORKER_EXPERIMENTS_FILE)",
    )
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        help="allowed absolute deviation of an arm's share (default: %(default)s)",
    )
    parser.add_argument(
        "--min-per-cell",
        type=integer(0),
        default=DEFAULT_MIN_PER_CELL,
        help="minimum members per segment per arm (default: %(default)s)",
    )
    parser.add_argument("--id-column", default="customer_id", help="member id column (default: %(default)s)")
    parser.add_argument("--segment-column", default="segment", help="segment column (default: %(default)s)")
    parser.add_argument("--format", choices=("csv", "jsonl"), help="input format (default: from the extension)")
    parser.add_argument("--out", type=Path, required=True, help="assignments file: .csv or .jsonl")
    parser.add_argument("--report", type=Path, help="balance report file (JSON)")
    parser.add_argument(
        "--assigned-at", metavar="ISO8601", help="timestamp for every record, e.g. 2025-11-23T09:00:00Z (default: now)"
    )
    parser.add_argument(
        "--max-errors", type=integer(1), default=50, help="input problems to print (default: %(default)s)"
    )
    parser.set_defaults(func=run_stratify)


def _add_plan(subparsers: Subcommands) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="minimum detectable effect and sample size for an A/B/n test on a rate",
        description="Minimum detectable effect of each treatment against control at a given size\n"
        "per arm, and the size per arm a given relative lift needs.",
        epilog=PLAN_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--arms", type=integer(2), default=2, help="arms including control (default: %(default)s)")
    parser.add_argument("--per-arm", type=integer(1), help="members per arm, for the MDE and power")
    parser.add_argument("--baseline", type=_rate, required=True, help="control rate, e.g. 0.25 for a 25%% open rate")
    parser.add_argument("--alpha", type=_rate, default=0.05, help="two-sided significance level (default: %(default)s)")
    parser.add_argument("--power", type=_rate, default=0.8, help="target power (default: %(default)s)")
    parser.add_argument(
        "--lift", type=float, default=0.15, help="relative lift to size for, 0.15 = +15%% (default: %(default)s)"
    )
    parser.add_argument(
        "--bonferroni", action="store_true", help="test each of the arms-1 comparisons at alpha/(arms-1)"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.set_defaults(func=run_plan)


def add_commands(subparsers: Subcommands) -> None:
    """Register ``stratify`` and ``plan``; each sets ``func(args) -> exit status``."""
    _add_stratify(subparsers)
    _add_plan(subparsers)
