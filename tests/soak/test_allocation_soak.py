"""Issue 18's bit-exact claim over 1,000,000 ids: ``AB_WORKER_SOAK=1 .venv/bin/pytest tests/soak -m soak``."""

from __future__ import annotations

import os

import pytest

from tests import allocation_claims as claims

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("AB_WORKER_SOAK") != "1", reason="soak run: set AB_WORKER_SOAK=1"),
]


def test_bit_exact_over_a_million_ids():
    """Every demo experiment and segment split: the same vector of variants as the seed rule over 1M ids."""
    for name, (before, after) in claims.bit_exact(1_000_000).items():
        assert before == after, name


def test_ramp_and_layers_over_a_million_ids():
    """Nesting, no exposed user moved, and no user shared between the slices of a layer, at 1M users."""
    ramp = claims.ramp(1_000_000)
    assert ramp["nested"]
    assert ramp["moved"] == 0
    layers = claims.layers_and_holdouts(1_000_000)
    assert layers["shared"] == 0
    assert layers["held out differently"] == 0
