"""Planning and health statistics for experiments: two-proportion power, and sample-ratio mismatch.

Two proportions (normal approximation)
--------------------------------------
Sample size per group to detect ``p1 → p2`` (Fleiss 1981, without continuity correction; Chow,
Shao & Wang, *Sample Size Calculations in Clinical Research*, §4.2; the formula behind Evan
Miller's online calculator)::

    n = ( z_a · √(2·p̄·(1−p̄)) + z_b · √(p1·(1−p1) + p2·(1−p2)) )² / (p2 − p1)²,   p̄ = (p1 + p2) / 2

with ``z_a = z(1 − α/2)`` (two-sided; ``z(1 − α)`` one-sided; α divided by the number of
comparisons under Bonferroni) and ``z_b = z(power)``. The variance under H0 is pooled (both groups
share p̄), the variance under H1 is not. Baseline 0.10 → 0.12 at α 0.05 two-sided, power 0.80 gives
3,840.8 → **3,841 per group**; the fully unpooled formula would give 3,839.

Minimum detectable effect: the smallest ``p2 > p1`` that solves the same equation for a given n,
found by a grid scan and bisection — exact for this formula. The common shortcut
``(z_a + z_b) · √(2·p1·(1−p1)/n)`` assumes the variance at p2 equals the variance at p1; it is
reported alongside (:attr:`DetectableEffect.shortcut_absolute`) but never used for decisions.

Power for a given n counts both rejection regions of a two-sided test::

    power = Φ((|Δ|·√n − z_a·σ0) / σ1) + Φ((−|Δ|·√n − z_a·σ0) / σ1)

(σ0, σ1 the square roots above). The sample-size and MDE equations drop the second term, which is
below α/2, as is customary.

Sample-ratio mismatch
---------------------
:func:`srm_test` is Pearson's chi-square goodness-of-fit test of observed arm counts against the
configured split, ``p = chi2.sf(Σ (o − e)² / e, k − 1)``, flagged below 0.001 (the usual SRM
threshold: at that level a flag almost always means a broken assignment or logging pipeline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from statistics import NormalDist

from worker.domain.errors import WorkerError

SRM_THRESHOLD = 0.001
_NORMAL = NormalDist()
#: Grid steps used to bracket the smallest root of the MDE equation before bisection.
_MDE_GRID = 4000


class StatsInputError(WorkerError, ValueError):
    """A statistics function was given a value outside its domain (a rate not in (0, 1), n < 1…)."""


def _probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) < 1.0:
        raise StatsInputError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StatsInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def critical_z(alpha: float, *, two_sided: bool = True, comparisons: int = 1) -> float:
    """The z value a test statistic must exceed: ``z(1 − α/(2m))`` two-sided, ``z(1 − α/m)`` one-sided."""
    per_comparison = _probability("alpha", alpha) / _positive_int("comparisons", comparisons)
    return _NORMAL.inv_cdf(1.0 - per_comparison / (2.0 if two_sided else 1.0))


def _sigmas(p1: float, p2: float) -> tuple[float, float]:
    """``(σ0, σ1)``: the pooled null and the unpooled alternative standard deviations (n = 1)."""
    pooled = (p1 + p2) / 2.0
    return math.sqrt(2.0 * pooled * (1.0 - pooled)), math.sqrt(p1 * (1.0 - p1) + p2 * (1.0 - p2))


def sample_size_exact(
    p1: float,
    p2: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    two_sided: bool = True,
    comparisons: int = 1,
) -> float:
    """The per-group n of the module formula, before rounding up."""
    p1, p2 = _probability("p1", p1), _probability("p2", p2)
    if p1 == p2:
        raise StatsInputError("p1 and p2 must differ: no sample size detects a zero effect")
    z_a = critical_z(alpha, two_sided=two_sided, comparisons=comparisons)
    z_b = _NORMAL.inv_cdf(_probability("power", power))
    sigma0, sigma1 = _sigmas(p1, p2)
    return ((z_a * sigma0 + z_b * sigma1) / (p2 - p1)) ** 2


def sample_size_per_group(
    p1: float,
    p2: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    two_sided: bool = True,
    comparisons: int = 1,
) -> int:
    """Members needed in each of the two groups to detect ``p1 → p2`` (the module formula, rounded up)."""
    exact = sample_size_exact(p1, p2, alpha=alpha, power=power, two_sided=two_sided, comparisons=comparisons)
    return math.ceil(exact)


def power_two_proportions(
    p1: float,
    p2: float,
    n_per_group: int,
    *,
    alpha: float = 0.05,
    two_sided: bool = True,
    comparisons: int = 1,
) -> float:
    """Probability that the z-test rejects H0 when the true rates are ``p1`` and ``p2``."""
    p1, p2 = _probability("p1", p1), _probability("p2", p2)
    root_n = math.sqrt(_positive_int("n_per_group", n_per_group))
    z_a = critical_z(alpha, two_sided=two_sided, comparisons=comparisons)
    sigma0, sigma1 = _sigmas(p1, p2)
    delta = abs(p2 - p1) * root_n
    near = _NORMAL.cdf((delta - z_a * sigma0) / sigma1)
    far = _NORMAL.cdf((-delta - z_a * sigma0) / sigma1) if two_sided else 0.0
    return near + far


@dataclass(frozen=True, slots=True)
class DetectableEffect:
    """The smallest upward change from ``baseline`` a test of the given size detects."""

    baseline: float
    treatment_rate: float
    #: ``treatment_rate − baseline``.
    absolute: float
    #: ``absolute / baseline``.
    relative: float
    #: The pooled shortcut ``(z_a + z_b)·√(2·p1·(1−p1)/n)``, for comparison only.
    shortcut_absolute: float


def minimum_detectable_effect(
    baseline: float,
    n_per_group: int,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    two_sided: bool = True,
    comparisons: int = 1,
) -> DetectableEffect | None:
    """Solve the sample-size equation for the smallest detectable ``p2 > baseline``.

    ``None`` when no rate up to 1 is detectable with ``n_per_group`` members per group.
    """
    p1 = _probability("baseline", baseline)
    root_n = math.sqrt(_positive_int("n_per_group", n_per_group))
    z_a = critical_z(alpha, two_sided=two_sided, comparisons=comparisons)
    z_b = _NORMAL.inv_cdf(_probability("power", power))

    def gap(p2: float) -> float:
        sigma0, sigma1 = _sigmas(p1, p2)
        return root_n * (p2 - p1) - z_a * sigma0 - z_b * sigma1

    # The equation can have more than one root for tiny n; scanning first finds the smallest.
    low, high = p1, None
    for step in range(1, _MDE_GRID + 1):
        candidate = p1 + (1.0 - p1) * step / _MDE_GRID
        if gap(candidate) >= 0.0:
            high = candidate
            break
        low = candidate
    if high is None:
        return None
    for _ in range(200):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        low, high = (middle, high) if gap(middle) < 0.0 else (low, middle)
    shortcut = (z_a + z_b) * math.sqrt(2.0 * p1 * (1.0 - p1)) / root_n
    return DetectableEffect(p1, high, high - p1, (high - p1) / p1, shortcut)


@dataclass(frozen=True, slots=True)
class ExperimentPlan:
    """What an A/B/n test of each treatment against control can detect, and what it would need."""

    arms: int
    baseline: float
    alpha: float
    power: float
    bonferroni: bool
    #: Treatment-versus-control comparisons: ``arms − 1``.
    comparisons: int
    #: α each comparison is tested at: ``alpha / comparisons`` under Bonferroni, else ``alpha``.
    alpha_per_comparison: float
    lift: float
    lift_rate: float
    sample_size_for_lift: int
    per_arm: int | None
    mde: DetectableEffect | None
    power_at_lift: float | None


def plan_experiment(
    *,
    arms: int,
    baseline: float,
    lift: float,
    per_arm: int | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
    bonferroni: bool = False,
) -> ExperimentPlan:
    """MDE and power at ``per_arm``, and the per-arm n for a relative ``lift``; two-sided tests."""
    if isinstance(arms, bool) or not isinstance(arms, int) or arms < 2:
        raise StatsInputError(f"arms must be an integer >= 2 (control plus treatments), got {arms!r}")
    p1 = _probability("baseline", baseline)
    lift_rate = p1 * (1.0 + lift)
    if not lift > 0.0 or not lift_rate < 1.0:
        raise StatsInputError(
            f"lift must be > 0 with baseline × (1 + lift) < 1, got lift {lift!r} (rate {lift_rate!r})"
        )
    comparisons = arms - 1 if bonferroni else 1
    mde = power_at_lift = None
    if per_arm is not None:
        mde = minimum_detectable_effect(p1, per_arm, alpha=alpha, power=power, comparisons=comparisons)
        power_at_lift = power_two_proportions(p1, lift_rate, per_arm, alpha=alpha, comparisons=comparisons)
    needed = sample_size_per_group(p1, lift_rate, alpha=alpha, power=power, comparisons=comparisons)
    return ExperimentPlan(
        arms=arms,
        baseline=p1,
        alpha=alpha,
        power=power,
        bonferroni=bonferroni,
        comparisons=arms - 1,
        alpha_per_comparison=alpha / comparisons,
        lift=lift,
        lift_rate=lift_rate,
        sample_size_for_lift=needed,
        per_arm=per_arm,
        mde=mde,
        power_at_lift=power_at_lift,
    )


@dataclass(frozen=True, slots=True)
class SrmResult:
    """Pearson chi-square goodness of fit of arm counts to the configured split."""

    chi2: float
    dof: int
    p_value: float
    observed: dict[str, int]
    expected: dict[str, float]
    #: ``p_value < threshold``: the split is almost certainly not what was configured.
    flagged: bool
    threshold: float = SRM_THRESHOLD


def _srm_problems(observed: Mapping[str, int], expected_ratio: Mapping[str, float]) -> list[str]:
    problems = []
    if set(observed) != set(expected_ratio):
        only_observed = sorted(set(observed) - set(expected_ratio))
        only_expected = sorted(set(expected_ratio) - set(observed))
        problems.append(f"arms differ: observed only {only_observed}, expected only {only_expected}")
    if len(expected_ratio) < 2:
        problems.append(f"need at least two arms, got {len(expected_ratio)}")
    for arm, count in observed.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            problems.append(f"observed count for {arm!r} must be an integer >= 0, got {count!r}")
    for arm, ratio in expected_ratio.items():
        valid = not isinstance(ratio, bool) and isinstance(ratio, Real)
        if not valid or not math.isfinite(float(ratio)) or float(ratio) <= 0.0:
            problems.append(f"expected ratio for {arm!r} must be a finite number > 0, got {ratio!r}")
    return problems


def srm_test(
    observed: Mapping[str, int],
    expected_ratio: Mapping[str, float],
    *,
    threshold: float = SRM_THRESHOLD,
) -> SrmResult:
    """Sample-ratio-mismatch test: are the observed arm counts consistent with the split?

    ``expected_ratio`` is normalised, so ``{"A": 1, "B": 1}`` and ``{"A": 0.5, "B": 0.5}`` agree.
    """
    problems = _srm_problems(observed, expected_ratio)
    total = sum(observed.values()) if not problems else 0
    if not problems and total == 0:
        problems.append("observed counts are all zero")
    if problems:
        raise StatsInputError("; ".join(problems))
    from scipy.stats import chi2 as chi2_distribution  # slow import: only when a test is run

    ratio_sum = math.fsum(float(r) for r in expected_ratio.values())
    expected = {arm: total * float(expected_ratio[arm]) / ratio_sum for arm in observed}
    statistic = math.fsum((observed[arm] - e) ** 2 / e for arm, e in expected.items())
    dof = len(observed) - 1
    p_value = float(chi2_distribution.sf(statistic, dof))
    return SrmResult(
        chi2=statistic,
        dof=dof,
        p_value=p_value,
        observed=dict(observed),
        expected=expected,
        flagged=p_value < threshold,
        threshold=threshold,
    )
