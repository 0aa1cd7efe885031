"""``ExperimentRegistry.assign`` beside the ``growthbook`` package's ``run()``, on the same experiment.

``python -m bench.bench_growthbook`` (needs the benchmark-only extra: ``pip install -e '.[bench]'``;
without ``growthbook`` installed it says so and measures our side alone).

The experiment (issue 18's "full-featured" one): targeting with three conditions, a 5% holdout, a
layer slice, 80% coverage and ten overrides, split 50/30/20. Its GrowthBook equivalent, each part
by GrowthBook's own means:

* **targeting** — ``condition``, the same three conditions (GrowthBook has ``$in``, ``$vgte`` and
  ``$gte`` with the same meaning);
* **layer** — ``namespace=("checkout", 0.0, 0.9)``, GrowthBook's mutual-exclusion slices;
* **coverage** — ``coverage=0.8``;
* **overrides** — ``forced_variations``, which is how ``run()`` forces a user's variation: the caller
  sets it per user, so the harness looks each user up in the ten overrides, as an app would;
* **holdout** — measured two ways, because GrowthBook has two faithful equivalents: (a) as a hash
  filter (``filters``, the namespace mechanism with its own seed: the same users held out in every
  experiment that carries it; GrowthBook then takes the layer as a filter too, since ``filters``
  replaces ``namespace``), the cheapest; (b) as GrowthBook's Holdouts model it, a holdout feature
  that each experiment names in ``parentConditions`` (a gate evaluated per call).

Every user's context matches the targeting, so both sides walk every step (the slowest path). Our
side calls the public API as a user would (``at=None``: the current time; the id checked by the wire
contract's rule; an :class:`Assignment` built). Rounds are interleaved and timed in CPU time;
the table shows medians and the ratio against the faster GrowthBook variant (target: at least 3x).
Each side's share of users in the experiment is printed too, as a check that both really decide
(the expected share is 0.95 x 0.9 x 0.8 = 0.684).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable
from typing import Any

from bench.timing import cpu_seconds
from tests import allocation_claims as claims
from worker.domain.registry import ExperimentRegistry

SPLIT = claims.SPLIT
VARIANTS = sorted(SPLIT)
OVERRIDES = {f"qa-{i}": VARIANTS[i % len(VARIANTS)] for i in range(10)}
TARGETING = {"country": {"$in": ["US", "CA"]}, "app_version": {"$vgte": "5.2.0"}, "age": {"$gte": 18}}
CONTEXT = {"country": "US", "app_version": "5.3.1", "age": 30}
HOLDOUT_SHARE, LAYER, COVERAGE = 0.05, (0.0, 0.9), 0.8

FILE = {
    "layers": [{"id": "checkout"}],
    "holdouts": [{"id": "q1", "share": HOLDOUT_SHARE}],
    "experiments": [
        {
            "id": "exp_full",
            "split": SPLIT,
            "coverage": COVERAGE,
            "layer": {"id": "checkout", "range": list(LAYER)},
            "holdouts": ["q1"],
            "targeting": TARGETING,
            "overrides": OVERRIDES,
        }
    ],
}


def ours(ids: list[str]) -> tuple[Callable[[], None], Callable[[], float]]:
    """The round over ``ids`` through ``ExperimentRegistry.assign``, and the share it put in the experiment."""
    assign = ExperimentRegistry.from_dict(FILE, "bench").assign

    def run() -> None:
        for user in ids:
            assign("exp_full", user, context=CONTEXT)

    def share() -> float:
        return sum(assign("exp_full", user, context=CONTEXT).in_experiment for user in ids) / len(ids)

    return run, share


def growthbook_run(ids: list[str], holdout: str) -> tuple[Callable[[], None], Callable[[], float]]:
    """The round over ``ids`` through ``GrowthBook.run``; ``holdout`` is ``filter`` or ``parent``."""
    from growthbook import Experiment, GrowthBook

    logging.getLogger("growthbook").setLevel(logging.WARNING)
    weights = [SPLIT[v] for v in VARIANTS]
    common: dict[str, Any] = {
        "key": "exp_full",
        "variations": VARIANTS,
        "weights": weights,
        "coverage": COVERAGE,
        "condition": TARGETING,
        "hashAttribute": "id",
        "hashVersion": 2,
    }
    features: dict[str, Any] = {}
    if holdout == "filter":
        filters = [
            {"seed": "holdout:q1", "ranges": [(HOLDOUT_SHARE, 1.0)], "attribute": "id", "hashVersion": 2},
            {"seed": "layer:checkout", "ranges": [LAYER], "attribute": "id", "hashVersion": 2},
        ]
        experiment = Experiment(**common, filters=filters)
    else:
        features["$holdout:q1"] = {
            "defaultValue": "genpop",
            "rules": [
                {
                    "key": "holdout-q1",
                    "variations": ["held", "genpop"],
                    "ranges": [[0.0, HOLDOUT_SHARE], [HOLDOUT_SHARE, 1.0]],
                    "hashAttribute": "id",
                    "seed": "q1",
                    "hashVersion": 2,
                }
            ],
        }
        parents = [{"id": "$holdout:q1", "condition": {"value": "genpop"}, "gate": True}]
        experiment = Experiment(**common, namespace=("checkout", *LAYER), parentConditions=parents)
    gb = GrowthBook(features=features)
    forced = {user: VARIANTS.index(variant) for user, variant in OVERRIDES.items()}
    none: dict[str, int] = {}

    def one(user: str) -> Any:
        index = forced.get(user)
        gb.set_forced_variations(none if index is None else {"exp_full": index})
        gb.set_attributes({"id": user, **CONTEXT})
        return gb.run(experiment)

    def run() -> None:
        for user in ids:
            one(user)

    def share() -> float:
        return sum(bool(one(user).inExperiment) for user in ids) / len(ids)

    return run, share


def main(argv: list[str] | None = None) -> int:
    """Interleaved rounds of each contender; medians, ratios, and each side's share in the experiment."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    ids = [*OVERRIDES, *claims.users(args.users - len(OVERRIDES))]
    contenders = {"ExperimentRegistry.assign": ours(ids)}
    try:
        import growthbook

        version = getattr(growthbook, "__version__", "?")
        contenders[f"growthbook {version} run(), holdout as a filter"] = growthbook_run(ids, "filter")
        contenders[f"growthbook {version} run(), holdout as a parent condition"] = growthbook_run(ids, "parent")
    except ImportError:
        print("growthbook is not installed: install the benchmark extra (pip install -e '.[bench]') to compare;")
        print("measuring ExperimentRegistry.assign alone.")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeat):
        for name, (run, _) in contenders.items():
            times[name].append(cpu_seconds(run))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{len(ids):,} users, {args.repeat} interleaved rounds, medians of CPU time:")
    for name, seconds in median.items():
        share = contenders[name][1]()
        print(f"  {name:<56}{seconds / len(ids) * 1e6:8.2f} us/user   in the experiment: {share:.3f}")
    others = [seconds for name, seconds in median.items() if name != "ExperimentRegistry.assign"]
    if others:
        ratio = min(others) / median["ExperimentRegistry.assign"]
        verdict = "PASS" if ratio >= 3 else "MISS"
        print(f"ExperimentRegistry.assign vs the faster GrowthBook variant: {ratio:.2f}x (target >= 3x)  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
