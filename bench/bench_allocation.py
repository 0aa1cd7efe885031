"""Issue 18's pure measured claims at scale, and the speed of a decision: ``python -m bench.bench_allocation``.

Prints, over ``--users`` synthetic ids (default 1,000,000):

1. bit-exact: per demo experiment and segment split, the digest of the seed rule's variant vector
   (``ABAssignmentAgent``) and of ``decide``'s;
2. ramp: exposed users at coverage 0.1, 0.5 and 1, whether the sets nest, and exposed users moved;
3. independence: χ² p-values of variant × exposure, × layer decile, × holdout;
4. layers and holdouts: users shared between three slices of one layer, holdout sets compared;

then, side by side over ``--speed-users`` ids (interleaved rounds, medians of CPU time): the seed's
reference, ``assign_user``, ``decide`` on a plain experiment and on a full-featured one (targeting
with three conditions, a holdout, a layer, coverage, ten overrides).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from bench.timing import cpu_seconds
from schemas.models import ExperimentFile
from tests import allocation_claims as claims
from tests.reference import ReferenceAgent
from worker import ABAssignmentAgent
from worker.domain.allocation import compile_file

FULL = {
    "layers": [{"id": "checkout"}],
    "holdouts": [{"id": "q1", "share": 0.05}],
    "experiments": [
        {"id": "exp_plain", "split": claims.SPLIT},
        {
            "id": "exp_full",
            "split": claims.SPLIT,
            "coverage": 0.8,
            "layer": {"id": "checkout", "range": [0.0, 0.9]},
            "holdouts": ["q1"],
            "targeting": {"country": {"$in": ["US", "CA"]}, "app_version": {"$vgte": "5.2.0"}, "age": {"$gte": 18}},
            "overrides": {f"qa-{i}": "test_1" for i in range(10)},
        },
    ],
}
CONTEXT = {"country": "US", "app_version": "5.3.1", "age": 30}


def speed(count: int, repeat: int) -> None:
    """Medians of interleaved rounds, and ratios against the reference."""
    ids = claims.users(count)
    compiled = compile_file(ExperimentFile.model_validate(FULL)).experiments
    plain, full = compiled["exp_plain"].decide, compiled["exp_full"].decide
    reference, agent = ReferenceAgent(claims.SPLIT).assign_user, ABAssignmentAgent(claims.SPLIT).assign_user
    at = claims.AT

    def loop(call: Callable[[str], object]) -> Callable[[], None]:
        def run() -> None:
            for user in ids:
                call(user)

        return run

    contenders = {
        "reference assign_user": loop(lambda user: reference(user, "exp_plain")),
        "ABAssignmentAgent.assign_user": loop(lambda user: agent(user, "exp_plain")),
        "decide, plain experiment": loop(lambda user: plain(user, None, None, at)),
        "decide, full-featured": loop(lambda user: full(user, None, CONTEXT, at)),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, run in contenders.items():
            times[name].append(cpu_seconds(run))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{count:,} ids, {repeat} interleaved rounds, medians (CPU time):")
    for name, seconds in median.items():
        ratio = median["reference assign_user"] / seconds
        print(f"  {name:<32}{seconds / count * 1e6:8.2f} us/id {ratio:7.2f}x reference")


def main(argv: list[str] | None = None) -> int:
    """Run every claim, then the speed table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--speed-users", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"bit-exact over {args.users:,} ids (seed rule digest, decide digest):")
    for name, (before, after) in claims.bit_exact(args.users).items():
        print(f"  {name:<40}{before}  {after}  {'SAME' if before == after else 'DIFFERENT'}")
    print(f"ramp over {args.users:,} users: {claims.ramp(args.users)}")
    print(f"independence over {args.users:,} users, chi-squared p-values: {claims.independence(args.users)}")
    print(f"layers and holdouts over {args.users:,} users: {claims.layers_and_holdouts(args.users)}")
    speed(args.speed_users, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
