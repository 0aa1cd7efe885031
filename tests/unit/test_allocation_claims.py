"""Issue 18's measured claims on 100,000 synthetic users (1,000,000 in the soak run and ``bench.bench_allocation``)."""

from __future__ import annotations

from tests import allocation_claims as claims

USERS = 100_000


def test_experiments_without_the_new_fields_are_bit_exact():
    """Every demo experiment and segment split: decide gives the seed rule's variants, digest for digest."""
    results = claims.bit_exact(USERS)
    assert len(results) >= 5
    for name, (before, after) in results.items():
        assert before == after, name


def test_ramping_coverage_nests_and_moves_no_exposed_user():
    """0.1 → 0.5 → 1: each exposed set contains the last, and no exposed user changes variant."""
    result = claims.ramp(USERS)
    assert result["nested"]
    assert result["moved"] == 0
    exposed = result["exposed"]
    assert exposed[1.0] == USERS
    assert abs(exposed[0.1] - 0.1 * USERS) < 0.01 * USERS
    assert abs(exposed[0.5] - 0.5 * USERS) < 0.01 * USERS


def test_variant_is_independent_of_exposure_layer_and_holdout():
    """χ² of variant × exposure, × layer decile, × holdout: p > 0.001 for each (separate hash inputs)."""
    for name, p_value in claims.independence(USERS).items():
        assert p_value > 0.001, (name, p_value)


def test_layers_share_no_user_and_holdouts_hold_out_the_same_users():
    """Three slices of one layer partition the users; one holdout is the same users in two experiments."""
    result = claims.layers_and_holdouts(USERS)
    assert result["shared"] == 0
    assert result["covered"] == USERS
    assert all(abs(size - USERS / 3) < 0.01 * USERS for size in result["slot sizes"])
    assert result["held out differently"] == 0
    assert abs(result["held out"][0] - 0.05 * USERS) < 0.005 * USERS
