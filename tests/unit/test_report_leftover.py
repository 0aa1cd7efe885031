"""The SRM report expects what assignment does: a split summing to 0.99 gives its last variant the
leftover, so 200,000 healthy assignments must not raise a sample-ratio alarm (issue 10 E16)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from worker.domain.assignment import VariantTable, assign_variants
from worker.domain.srm.report import assigned_shares, build_report
from worker.domain.srm.tally import Tally

SPLIT = {"A": 0.5, "B": 0.49}  # sums to 0.99: accepted by validate_split
WHEN = datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_assigned_shares_give_the_last_variant_the_leftover() -> None:
    """A=0.5,B=0.49 assigns half to each; A=0.3,B=0.3,C=0.39 gives C 0.4; exact splits are unchanged."""
    assert dict(assigned_shares((("A", 0.5), ("B", 0.49)))) == pytest.approx({"A": 0.5, "B": 0.5})
    assert dict(assigned_shares((("A", 0.3), ("B", 0.3), ("C", 0.39)))) == pytest.approx({"A": 0.3, "B": 0.3, "C": 0.4})
    # Bucket-exact: B's range ends at 0.30000000000000004, so the bucket 0.3 is B's (docs/wire-contract.md, "The rule").
    assert dict(assigned_shares((("A", 0.1), ("B", 0.2), ("C", 0.7)))) == {"A": 0.1, "B": 0.200001, "C": 0.699999}
    assert dict(assigned_shares((("A", 0.6), ("B", 0.41)))) == pytest.approx({"A": 0.6, "B": 0.4})


def test_a_split_summing_to_099_raises_no_false_srm_alarm() -> None:
    """200,000 users assigned by the real rule under A=0.5,B=0.49: the report finds no mismatch."""
    users = [f"user-{i}" for i in range(200_000)]
    _, variants = assign_variants(users, "exp_leftover", VariantTable(SPLIT))
    counts = Counter(variants)
    tally = Tally()
    split = tuple(sorted(SPLIT.items()))
    for variant, count in counts.items():
        tally.add_cell("exp_leftover", "", variant, split, WHEN, count=count)

    report = build_report(tally, generated_at=WHEN)

    (group,) = report.groups
    shares = {v.variant: v.expected_share for v in group.variants}
    assert shares == pytest.approx({"A": 0.5, "B": 0.5})
    assert group.p_value is not None
    assert group.p_value > 0.001
    assert not group.flagged
