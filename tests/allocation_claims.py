"""The measured claims of issue 18 that are pure, computed once for tests and for ``bench.bench_allocation``.

- bit-exact: an experiment without the new fields gives the seed rule's vector of variants;
- ramp: coverage 0.1 → 0.5 → 1 gives nested exposed sets and moves no exposed user;
- independence: variant × exposure, variant × layer decile, variant × holdout (χ² p-values);
- layers: experiments in one layer share no user; holdouts: the same users in every experiment.

Each function takes the number of synthetic users, so the default test run uses 100,000 and the
benchmark (and the soak test) 1,000,000.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from scipy.stats import chi2_contingency

from schemas.models import ExperimentFile
from worker import ABAssignmentAgent
from worker.domain.allocation import AllocatedExperiment, compile_file
from worker.domain.allocation.experiment import hash_int

AT = datetime(2026, 12, 7, 12, tzinfo=UTC)
DEMO = Path(__file__).resolve().parent.parent / "deploy" / "experiments.yaml"
SPLIT = {"control": 0.5, "test_1": 0.3, "test_2": 0.2}
#: The fields an experiment had before allocation: one that sets no other is the seed rule alone.
PLAIN_FIELDS = frozenset({"id", "version", "seed", "split", "variants", "segments", "description"})


def users(count: int, stem: str = "user") -> list[str]:
    """``user-0000000`` … : the same ids in every run."""
    return [f"{stem}-{i:07d}" for i in range(count)]


def _compile(document: dict[str, Any]) -> dict[str, AllocatedExperiment]:
    return dict(compile_file(ExperimentFile.model_validate(document)).experiments)


def _digest(values: list[str]) -> str:
    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


def bit_exact(count: int, document: dict[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """Per experiment without allocation fields (and segment split) of the demo file: (digest of the seed
    rule's variants, of decide's).

    The seed rule is ``ABAssignmentAgent`` (its batch path, held to the seed's conformance file). The
    demo's experiments that do use the fields (a layer, a holdout, coverage…) are left out: the claim
    is that the others are untouched.
    """
    document = document or yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    compiled = _compile(document)
    ids = users(count)
    results = {}
    for config in document["experiments"]:
        if not set(config) <= PLAIN_FIELDS:
            continue
        for segment in [None, *config.get("segments", {})]:
            split = config["segments"][segment] if segment else config["split"]
            agent = ABAssignmentAgent(split, seed=config.get("seed", "echovoice"))
            before = agent.assign_many(ids, config["id"])
            decide = compiled[config["id"]].decide
            after = [decide(user, segment, None, AT).variant_id for user in ids]
            results[f"{config['id']}/{segment or '-'}"] = (_digest(before), _digest(after))
    return results


def ramp(count: int) -> dict[str, Any]:
    """Coverage 0.1 → 0.5 → 1 on one experiment: exposed counts, nesting, and exposed users moved."""
    stages = {}
    for coverage in (0.1, 0.5, 1.0):
        experiment = _compile({"experiments": [{"id": "exp_ramp", "split": SPLIT, "coverage": coverage}]})["exp_ramp"]
        stages[coverage] = {
            user: decision.variant_id
            for user in users(count)
            if (decision := experiment.decide(user, None, None, AT)).in_experiment
        }
    moved = sum(
        1
        for low, high in ((0.1, 0.5), (0.5, 1.0))
        for user, variant in stages[low].items()
        if stages[high].get(user) != variant
    )
    return {
        "exposed": {coverage: len(exposed) for coverage, exposed in stages.items()},
        "nested": set(stages[0.1]) <= set(stages[0.5]) <= set(stages[1.0]),
        "moved": moved,
    }


def independence(count: int) -> dict[str, float]:
    """χ² p-values of the seed-rule variant against exposure, layer decile and holdout membership."""
    # The same experiment twice: at coverage 0.5 it gives exposure, at full coverage every user's
    # variant (an exposed user's variant must be that one: checked on the way).
    covered = _compile({"experiments": [{"id": "exp_ind", "split": SPLIT, "coverage": 0.5}]})["exp_ind"]
    plain = _compile({"experiments": [{"id": "exp_ind", "split": SPLIT}]})["exp_ind"]
    exposure: Counter[tuple[str, bool]] = Counter()
    decile: Counter[tuple[str, int]] = Counter()
    held: Counter[tuple[str, bool]] = Counter()
    for user in users(count):
        variant = plain.decide(user, None, None, AT).variant_id
        decision = covered.decide(user, None, None, AT)
        assert not decision.in_experiment or decision.variant_id == variant
        exposure[variant, decision.in_experiment] += 1
        decile[variant, hash_int(f"layer:page:{user}") * 10 // 1_000_000] += 1
        held[variant, hash_int(f"holdout:h:{user}") < 100_000] += 1
    return {
        name: _p_value(table) for name, table in (("exposure", exposure), ("layer decile", decile), ("holdout", held))
    }


def _p_value(table: Counter[tuple[str, Any]]) -> float:
    rows = sorted({row for row, _ in table})
    columns = sorted({column for _, column in table})
    matrix = [[table[row, column] for column in columns] for row in rows]
    return float(chi2_contingency(matrix).pvalue)


def layers_and_holdouts(count: int) -> dict[str, Any]:
    """Three experiments in one layer share no user; two listing one holdout hold out the same users."""
    document = {
        "layers": [{"id": "checkout"}],
        "holdouts": [{"id": "q1", "share": 0.05}],
        "experiments": [
            {"id": "slot_a", "split": SPLIT, "layer": {"id": "checkout", "range": [0.0, 1 / 3]}},
            {"id": "slot_b", "split": SPLIT, "layer": {"id": "checkout", "range": [1 / 3, 2 / 3]}},
            {"id": "slot_c", "split": SPLIT, "layer": {"id": "checkout", "range": [2 / 3, 1.0]}},
            {"id": "held_1", "split": SPLIT, "holdouts": ["q1"]},
            {"id": "held_2", "split": {"A": 0.5, "B": 0.5}, "seed": "other", "holdouts": ["q1"], "coverage": 0.5},
        ],
    }
    compiled = _compile(document)
    ids = users(count)
    bucketed = {
        name: {user for user in ids if compiled[name].decide(user, None, None, AT).in_experiment}
        for name in ("slot_a", "slot_b", "slot_c")
    }
    held = {
        name: {user for user in ids if compiled[name].decide(user, None, None, AT).reason == "holdout"}
        for name in ("held_1", "held_2")
    }
    a, b, c = bucketed["slot_a"], bucketed["slot_b"], bucketed["slot_c"]
    return {
        "slot sizes": [len(a), len(b), len(c)],
        "shared": len(a & b) + len(a & c) + len(b & c),
        "covered": len(a | b | c),
        "held out": [len(held["held_1"]), len(held["held_2"])],
        "held out differently": len(held["held_1"] ^ held["held_2"]),
    }
