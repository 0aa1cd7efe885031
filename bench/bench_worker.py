"""Every worker benchmark in one command: ``python -m bench.bench_worker`` (``make bench-worker``).

Runs, one after the other, each printing its own side-by-side table and target lines:

1. latency a requester sees (``bench_latency``): enqueue → event and → settled, p50/p99, at 5 and
   200 msg/s, and a filled queue; targets p99 ≤ 100 ms and settlement ≤ flush age + 1 s;
2. throughput against bare SDK loops (``bench_throughput``): receive+complete (target ≥ 0.90) and
   its apples-to-apples twin receive+publish+complete (target ≥ 1.40); then the worker on a
   full-featured experiment against a plain one (``--allocation``, target ≥ 0.90);
3. throughput with network delay (``bench_network``): 0, 2 and 10 ms each way (target ≥ 0.80 at 2 ms);
4. process scaling (``bench_scale --supervised``): 1 and 2 processes, and ``run --processes 2``
   against two independent processes (target ≥ 0.90).

The machine is shared and noisy: read the ratios within each table, not absolute rates across them.
"""

from __future__ import annotations

import argparse

from bench import bench_latency, bench_network, bench_scale, bench_throughput


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; ``--quick`` shrinks each for a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (minutes, not tens of minutes)")
    args = parser.parse_args(argv)
    size = 0.25 if args.quick else 1.0
    runs = [
        ("latency", bench_latency.main, ["--seconds", str(10 * size), "--fill", str(int(10_000 * size))]),
        (
            "throughput",
            bench_throughput.main,
            ["--messages", str(int(5_000 * size)), "--batch", "250", "--prefetch", "0"],
        ),
        (
            "throughput, plain against full-featured experiments",
            bench_throughput.main,
            ["--messages", str(int(5_000 * size)), "--batch", "250", "--prefetch", "0", "--allocation"],
        ),
        ("network delay", bench_network.main, ["--messages", str(int(3_000 * size))]),
        (
            "process scaling",
            bench_scale.main,
            ["--messages", str(int(20_000 * size)), "--workers", "1,2", "--supervised"],
        ),
    ]
    for title, run, arguments in runs:
        print(f"\n=== {title}: {' '.join(arguments)} ===", flush=True)
        run(arguments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
