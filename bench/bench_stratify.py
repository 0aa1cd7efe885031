"""Benchmark: stratify a 1,000,000-member cohort from a CSV file (read + assign + check + write).

Run ``.venv/bin/python bench/bench_stratify.py [--members N] [--tracemalloc]``. Generates the CSV
in a temporary folder, times each phase on one core and prints the peak memory: the process's
maximum resident set size (``resource.getrusage``), and with ``--tracemalloc`` a second, untimed
run's peak of Python allocations (tracemalloc slows everything down, so it never shares a run with
the timing). The target is under 10 s for 1,000,000 members.
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

from worker.cli.cohort_files import read_cohort, write_assignments, write_report
from worker.domain.cohort.stratify import stratify_columns

ARMS = ["control", "treatment_1", "treatment_2", "treatment_3"]
#: The seed document's segment mix: 33.6% / 58.0% / 8.4%.
SEGMENTS = {"High-Value Recent": 0.336, "Standard": 0.58, "New Customer": 0.084}


def generate(path: Path, members: int) -> None:
    """A cohort CSV with the document's segment mix, rows in random order."""
    rng = random.Random(7)
    segments = rng.choices(list(SEGMENTS), weights=list(SEGMENTS.values()), k=members)
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["customer_id", "segment", "signup_channel"])
        writer.writerows((f"CUST-{i:08d}", segment, "email") for i, segment in enumerate(segments))


def run(folder: Path, source: Path) -> dict[str, float]:
    """One read → stratify → write pass; seconds per phase."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    cohort = read_cohort(source, "csv", "customer_id", "segment")
    seconds["read"] = time.perf_counter() - start
    mark = time.perf_counter()
    result = stratify_columns(
        cohort.member_ids,
        cohort.segments,
        ARMS,
        experiment_id="bench-exp",
        assigned_at=datetime(2025, 11, 23, 9, 0, tzinfo=UTC),
    )
    seconds["stratify"] = time.perf_counter() - mark
    mark = time.perf_counter()
    write_assignments(folder / "assignments.csv", "csv", result)
    write_report(folder / "report.json", result, source)
    seconds["write"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start
    assert result.report.passed, result.report.checks
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--tracemalloc", action="store_true", help="also measure Python allocations (untimed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        source = folder / "cohort.csv"
        generate(source, args.members)
        print(f"{args.members:,} members, {source.stat().st_size / 1e6:.1f} MB CSV")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = run(folder, source)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("  ".join(f"{phase} {value:.2f} s" for phase, value in seconds.items()))
        # ru_maxrss is in KiB on Linux; the generator's own peak is included in "before".
        print(f"peak RSS {rss_after / 1024:.0f} MiB (was {rss_before / 1024:.0f} MiB before the timed run)")
        if args.tracemalloc:
            tracemalloc.start()
            run(folder, source)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(f"tracemalloc peak {peak / 2**20:.0f} MiB of Python allocations")


if __name__ == "__main__":
    main()
