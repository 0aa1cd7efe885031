"""Two-proportion power, sample size and MDE, and the sample-ratio-mismatch test, against published values."""

from __future__ import annotations

import math

import pytest

from worker.domain.srm.stats import (
    SRM_THRESHOLD,
    StatsInputError,
    critical_z,
    minimum_detectable_effect,
    plan_experiment,
    power_two_proportions,
    sample_size_exact,
    sample_size_per_group,
    srm_test,
)

# --- sample-ratio mismatch -----------------------------------------------------------------------


def test_srm_chi2_critical_value_gives_p_of_five_percent() -> None:
    """A statistic at the 5% critical value of chi-square with 1 dof (3.841) has p ≈ 0.05."""
    result = srm_test({"A": 5098, "B": 4902}, {"A": 0.5, "B": 0.5})  # chi2 = 2·98²/5000 = 3.8416
    assert result.chi2 == pytest.approx(3.8416)
    assert result.p_value == pytest.approx(0.05, abs=2e-4)
    assert critical_z(0.05) ** 2 == pytest.approx(3.841459, abs=1e-6)


def test_srm_small_imbalance_is_not_flagged() -> None:
    """5050 vs 4950 on a 50/50 split: chi2 = 1.0, p = 0.3173, not flagged."""
    result = srm_test({"control": 5050, "treatment": 4950}, {"control": 0.5, "treatment": 0.5})
    assert result.chi2 == pytest.approx(1.0)
    assert result.dof == 1
    assert result.p_value == pytest.approx(0.3173105, abs=1e-6)
    assert result.expected == {"control": 5000.0, "treatment": 5000.0}
    assert not result.flagged


def test_srm_classic_example_is_flagged() -> None:
    """821,588 vs 815,482 on a 50/50 split (Fabijan et al.): chi2 ≈ 22.77, p ≈ 1.8e-6, flagged."""
    result = srm_test({"A": 821_588, "B": 815_482}, {"A": 0.5, "B": 0.5})
    assert result.chi2 == pytest.approx(22.7744, abs=1e-4)
    assert result.p_value == pytest.approx(1.82e-6, rel=0.01)
    assert result.flagged
    assert result.threshold == SRM_THRESHOLD


def test_srm_three_arms_matches_closed_form() -> None:
    """With 2 dof the chi-square survival function is exp(-x/2): 1100/950/950 gives x = 15."""
    result = srm_test({"a": 1100, "b": 950, "c": 950}, {"a": 1, "b": 1, "c": 1})
    assert result.chi2 == pytest.approx(15.0)
    assert result.dof == 2
    assert result.p_value == pytest.approx(math.exp(-7.5), rel=1e-9)
    assert result.flagged


def test_srm_normalises_unequal_ratios() -> None:
    """Ratios are normalised: 2:1:1 weights and 0.5/0.25/0.25 agree, and exact counts give p = 1."""
    weights = srm_test({"a": 500, "b": 250, "c": 250}, {"a": 2, "b": 1, "c": 1})
    shares = srm_test({"a": 500, "b": 250, "c": 250}, {"a": 0.5, "b": 0.25, "c": 0.25})
    assert weights.chi2 == shares.chi2 == 0.0
    assert weights.p_value == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("observed", "ratio", "fragment"),
    [
        ({"A": 10, "B": 10}, {"A": 0.5, "C": 0.5}, "arms differ"),
        ({"A": 10}, {"A": 1.0}, "at least two arms"),
        ({"A": -1, "B": 10}, {"A": 0.5, "B": 0.5}, "integer >= 0"),
        ({"A": 1.5, "B": 10}, {"A": 0.5, "B": 0.5}, "integer >= 0"),
        ({"A": 10, "B": 10}, {"A": 0.0, "B": 1.0}, "finite number > 0"),
        ({"A": 10, "B": 10}, {"A": float("nan"), "B": 1.0}, "finite number > 0"),
        ({"A": 0, "B": 0}, {"A": 0.5, "B": 0.5}, "all zero"),
    ],
)
def test_srm_rejects_bad_input(observed: dict[str, int], ratio: dict[str, float], fragment: str) -> None:
    """Mismatched arms, negative or fractional counts, non-positive ratios and empty data are errors."""
    with pytest.raises(StatsInputError, match=fragment):
        srm_test(observed, ratio)


# --- power, sample size, MDE ------------------------------------------------------------------------


def test_sample_size_ten_to_twelve_percent() -> None:
    """0.10 → 0.12, alpha 0.05 two-sided, power 0.8: 3,840.8 → 3,841 per group (Evan Miller, R power.prop.test)."""
    assert sample_size_exact(0.10, 0.12) == pytest.approx(3840.847, abs=1e-3)
    assert sample_size_per_group(0.10, 0.12) == 3841


def test_sample_size_matches_r_documentation_example() -> None:
    """R's power.prop.test(p1 = .50, p2 = .75, power = .90) documents n = 76.7."""
    assert sample_size_exact(0.50, 0.75, power=0.90) == pytest.approx(76.7, abs=0.05)
    assert sample_size_per_group(0.50, 0.75, power=0.90) == 77


def test_power_matches_r_documentation_example() -> None:
    """R's power.prop.test(n = 50, p1 = .50, p2 = .75) documents power = 0.740."""
    assert power_two_proportions(0.50, 0.75, 50) == pytest.approx(0.7402, abs=1e-4)


def test_mde_matches_r_documentation_example() -> None:
    """R's power.prop.test(n = 50, p1 = .5, power = .90) documents p2 = 0.8026."""
    effect = minimum_detectable_effect(0.5, 50, power=0.90)
    assert effect is not None
    assert effect.treatment_rate == pytest.approx(0.8026, abs=1e-4)
    assert effect.absolute == pytest.approx(effect.treatment_rate - 0.5)
    assert effect.relative == pytest.approx(effect.absolute / 0.5)


@pytest.mark.parametrize(("baseline", "n"), [(0.25, 62), (0.10, 3841), (0.02, 500), (0.6, 40)])
def test_mde_inverts_sample_size(baseline: float, n: int) -> None:
    """The MDE is exact: the sample size needed for the MDE is n again, and the shortcut differs."""
    effect = minimum_detectable_effect(baseline, n)
    assert effect is not None
    assert sample_size_exact(baseline, effect.treatment_rate) == pytest.approx(n, rel=1e-9)
    assert effect.shortcut_absolute != pytest.approx(effect.absolute, rel=1e-3)


def test_power_at_sample_size_reaches_target() -> None:
    """At the rounded-up sample size the power is at least the target, and one member fewer is close."""
    n = sample_size_per_group(0.10, 0.12)
    assert power_two_proportions(0.10, 0.12, n) >= 0.80
    assert power_two_proportions(0.10, 0.12, n - 1) == pytest.approx(0.80, abs=1e-3)


def test_one_sided_and_bonferroni_change_the_critical_value() -> None:
    """One-sided tests use z(1 − α); Bonferroni divides α by the number of comparisons."""
    assert critical_z(0.05, two_sided=False) == pytest.approx(1.644854, abs=1e-6)
    assert critical_z(0.05, comparisons=3) == pytest.approx(2.393980, abs=1e-6)
    assert sample_size_per_group(0.10, 0.12, two_sided=False) < sample_size_per_group(0.10, 0.12)
    assert sample_size_per_group(0.10, 0.12, comparisons=3) > sample_size_per_group(0.10, 0.12)


def test_mde_is_none_when_nothing_is_detectable() -> None:
    """One member per group cannot detect any rate up to 100%."""
    assert minimum_detectable_effect(0.5, 1) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: sample_size_per_group(0.0, 0.1),
        lambda: sample_size_per_group(0.1, 0.1),
        lambda: sample_size_per_group(0.1, 0.2, power=1.0),
        lambda: power_two_proportions(0.1, 0.2, 0),
        lambda: minimum_detectable_effect(1.2, 10),
        lambda: critical_z(0.05, comparisons=0),
        lambda: plan_experiment(arms=1, baseline=0.25, lift=0.15),
        lambda: plan_experiment(arms=4, baseline=0.9, lift=0.2),
        lambda: plan_experiment(arms=4, baseline=0.25, lift=-0.1),
    ],
)
def test_out_of_domain_values_raise(call: object) -> None:
    """Rates outside (0, 1), equal rates, n < 1, power 1, fewer than two arms and impossible lifts raise."""
    with pytest.raises(StatsInputError):
        call()  # type: ignore[operator]


# --- the document's plan --------------------------------------------------------------------------


def test_document_plan_62_per_arm() -> None:
    """62 per arm on a 25% open rate detects ~+96% relative, not 10-15%; a 15% lift has ~7.6% power."""
    plan = plan_experiment(arms=4, baseline=0.25, lift=0.15, per_arm=62)
    assert plan.mde is not None
    assert plan.mde.absolute == pytest.approx(0.2407, abs=1e-4)
    assert plan.mde.relative == pytest.approx(0.963, abs=1e-3)
    assert plan.mde.shortcut_absolute == pytest.approx(0.2179, abs=1e-4)
    assert plan.power_at_lift == pytest.approx(0.0756, abs=1e-4)
    assert plan.sample_size_for_lift == 2193
    assert plan.comparisons == 3
    assert plan.alpha_per_comparison == 0.05


def test_document_plan_with_bonferroni() -> None:
    """With Bonferroni over 3 comparisons the MDE is ~+112% relative and a 15% lift needs 2,925 per arm."""
    plan = plan_experiment(arms=4, baseline=0.25, lift=0.15, per_arm=62, bonferroni=True)
    assert plan.mde is not None
    assert plan.mde.relative == pytest.approx(1.121, abs=1e-3)
    assert plan.alpha_per_comparison == pytest.approx(0.05 / 3)
    assert plan.sample_size_for_lift == 2925
