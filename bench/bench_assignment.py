"""Speed of the assignment rule, side by side in one run: ``python -m bench.bench_assignment``.

Compares, over the same user ids (default one million):

1. ``reference``  — a plain restatement of the seed's implementation (tests/reference.py), per user;
2. ``assign_user`` — the project's documented API, per user (returns the full dict);
3. ``batch``       — the project's batch path (``assign_variants``: map chains + numpy);
4. ``bare md5 (keys)``  — ``for key in keys: hashlib.md5(key).digest()`` over pre-encoded keys;
5. ``bare md5 (ids)``   — the same loop building each key from the user id first.

and, in the same rounds, the seed's own pattern of one agent per call site (per segment, per week):

6. ``reference: new agent + assign`` — ``ReferenceAgent(split).assign_user(...)`` per user;
7. ``agent: new agent + assign``     — ``ABAssignmentAgent(split).assign_user(...)`` per user;
8. ``agent: new split + assign``     — the same with a split no agent has used before (no sharing).

Each is run ``--repeat`` times interleaved; medians are reported, and ratios against the reference and
the bare loops. Times are CPU seconds of this process (``time.process_time``), so other work on a
shared machine moves them less than it moves the wall clock; still quote ratios and medians.
Afterwards ``tracemalloc`` measures the memory of ``--agents`` live agents (same split, and each with
its own split).
Targets (one core): assign_user >= 2x reference; batch at least as fast as the bare md5 loop;
new agent + assign at least as fast as the reference's; 20,000 live agents under 100 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import statistics
import tracemalloc
from collections.abc import Callable

from bench.timing import cpu_seconds
from tests.reference import ReferenceAgent
from worker import ABAssignmentAgent
from worker.domain.assignment import assign_variants

EXPERIMENT = "exp_bench"
SPLIT = {"control": 0.5, "test_1": 0.3, "test_2": 0.2}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table of medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000, help="user ids per run (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs per contender (default 5)")
    parser.add_argument("--agents", type=int, default=20_000, help="agents built per run (default 20,000)")
    args = parser.parse_args(argv)

    users = [f"user-{i:07d}" for i in range(args.users)]
    keys = [f"echovoice:{EXPERIMENT}:{u}".encode() for u in users]
    reference = ReferenceAgent(SPLIT)
    agent = ABAssignmentAgent(SPLIT)
    md5 = hashlib.md5

    def run_reference() -> None:
        assign = reference.assign_user
        for user in users:
            assign(user, EXPERIMENT)

    def run_assign_user() -> None:
        assign = agent.assign_user
        for user in users:
            assign(user, EXPERIMENT)

    def run_batch() -> None:
        assign_variants(users, EXPERIMENT, agent.table, agent.seed)

    def run_bare_keys() -> None:
        for key in keys:
            md5(key).digest()

    def run_bare_ids() -> None:
        for user in users:
            md5(f"echovoice:{EXPERIMENT}:{user}".encode()).digest()

    contenders = {
        "reference": run_reference,
        "assign_user": run_assign_user,
        "batch": run_batch,
        "bare md5 (keys)": run_bare_keys,
        "bare md5 (ids)": run_bare_ids,
    }
    agent_contenders = _agent_contenders(users[: args.agents])
    # Check the contenders agree before timing them.
    sample = users[:2000]
    expected = [reference.assign_user(u, EXPERIMENT)["variant_id"] for u in sample]
    assert [agent.assign_user(u, EXPERIMENT)["variant_id"] for u in sample] == expected
    assert assign_variants(sample, EXPERIMENT, agent.table, agent.seed)[1] == expected

    times: dict[str, list[float]] = {name: [] for name in contenders | agent_contenders}
    for round_ in range(args.repeat):
        for name, fn in (contenders | agent_contenders).items():
            times[name].append(cpu_seconds(fn))
        print(f"round {round_ + 1}/{args.repeat} done", flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.users:,} users, {args.repeat} interleaved runs, medians:")
    print(f"{'contender':<18}{'seconds':>9}{'users/s':>14}{'vs reference':>14}")
    for name, seconds in median.items():
        if name in agent_contenders:
            continue
        print(f"{name:<18}{seconds:>9.3f}{args.users / seconds:>14,.0f}{median['reference'] / seconds:>13.2f}x")
    speedup = median["reference"] / median["assign_user"]
    vs_keys = median["bare md5 (keys)"] / median["batch"]
    vs_ids = median["bare md5 (ids)"] / median["batch"]
    print(f"\nassign_user vs reference: {speedup:.2f}x (target >= 2x)  {'PASS' if speedup >= 2 else 'MISS'}")
    print(f"batch vs bare md5 over pre-built keys: {vs_keys:.2f}x (target >= 1x)  {'PASS' if vs_keys >= 1 else 'MISS'}")
    print(f"batch vs bare md5 building keys from ids: {vs_ids:.2f}x")
    _report_agents({name: median[name] for name in agent_contenders}, args.agents)
    return 0


def _agent_contenders(users: list[str]) -> dict[str, Callable[[], None]]:
    """The seed's pattern: a new agent per call site, one assignment each."""
    # Distinct splits (exactly representable shares, so each sums to 1.0) that no agent has seen.
    fresh_splits = ({"control": 0.5, "test_1": 0.5 - i / 2**40, "test_2": i / 2**40} for i in itertools.count(1))

    def run_reference_agents() -> None:
        for user in users:
            ReferenceAgent(SPLIT).assign_user(user, EXPERIMENT)

    def run_agents() -> None:
        for user in users:
            ABAssignmentAgent(SPLIT).assign_user(user, EXPERIMENT)

    def run_fresh_agents() -> None:
        for user in users:
            ABAssignmentAgent(next(fresh_splits)).assign_user(user, EXPERIMENT)

    return {
        "reference: new agent + assign": run_reference_agents,
        "agent: new agent + assign": run_agents,
        "agent: new split + assign": run_fresh_agents,
    }


def _report_agents(median: dict[str, float], count: int) -> None:
    print(f"\n{count:,} agents built, one assignment each, same rounds, medians:")
    print(f"{'contender':<32}{'us/agent':>10}{'vs reference':>14}")
    baseline = median["reference: new agent + assign"]
    for name, seconds in median.items():
        print(f"{name:<32}{seconds / count * 1e6:>10.2f}{baseline / seconds:>13.2f}x")
    ratio = baseline / median["agent: new agent + assign"]
    print(f"\nnew agent + assign vs reference: {ratio:.2f}x (target >= 1x)  {'PASS' if ratio >= 1 else 'MISS'}")
    for label, splits in (("same split", [SPLIT] * count), ("own split each", _distinct_splits(count))):
        mib = _live_agents_mib(splits)
        verdict = "PASS" if mib < 100 else "MISS"
        print(f"{count:,} live agents, {label}: {mib:.1f} MiB (target < 100 MiB)  {verdict}")


def _distinct_splits(count: int) -> list[dict[str, float]]:
    return [{"control": 0.25, "test_1": 0.75 - i / 2**40, "test_2": i / 2**40} for i in range(1, count + 1)]


def _live_agents_mib(splits: list[dict[str, float]]) -> float:
    """Memory held by one live agent per split (tables they share or own included), per tracemalloc."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    agents = [ABAssignmentAgent(split) for split in splits]
    for agent in agents[:: max(1, len(agents) // 100)]:
        agent.assign_user("U123", EXPERIMENT)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del agents
    return held / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
