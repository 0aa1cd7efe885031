"""Scale-out as competing consumers: ``python -m bench.bench_scale [--messages N] [--workers 1,2,4]``.

For each worker count, fills the embedded broker's queue (the broker runs in its own process) with N
requests, starts that many ``ab-worker run`` processes, and times from the moment every one is up
until every row was written (requests taken before that are left out of the rate); then stops the
workers with SIGTERM (they drain and exit 0). Checks that
every request produced exactly one distinct event id (redelivery duplicates must be byte-identical
rows), that nothing is left on the queue or in the dead-letter queue, and prints a table of
throughput and speed-up against one process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from azure.servicebus import ServiceBusClient, ServiceBusSubQueue

from bench.bench_throughput import QUEUE, fill, start_broker, stop_broker
from worker.service.handling import event_id_for

WORKER = [sys.executable, "-m", "worker", "--log-level", "WARNING"]
EXPERIMENTS = {"experiments": [{"id": "exp_bench", "split": {"A": 0.5, "B": 0.5}}]}


def run_workers(
    connection: str, count: int, workdir: Path, batch: int, messages: int, *, supervised: bool = False
) -> tuple[float, list[Path], list[str], float]:
    """Fill the queue, start ``count`` worker processes, and time them in steady state.

    ``supervised``: one ``ab-worker run --processes count`` instead of ``count`` independent runs.

    Returns the seconds the whole run would take at the steady-state rate (process start is excluded:
    it is not throughput), the rows files, the message ids and the workers' CPU seconds.
    """
    config = workdir / "experiments.json"
    config.write_text(json.dumps(EXPERIMENTS), encoding="utf-8")
    env = {
        **os.environ,
        "AB_WORKER_SERVICEBUS_CONNECTION_STRING": connection,
        "AB_WORKER_HEALTH_PORT": "0",
        "AB_WORKER_MAX_BATCH": str(batch),
    }
    kind = "sup" if supervised else "ind"
    rows = [workdir / f"rows-{kind}{count}-{i}.jsonl" for i in range(1, count + 1)]
    logs = [workdir / f"worker-{kind}{count}-{i}.log" for i in range(1, count + 1)]
    # The queue is filled first, so publishing does not compete with the workers for the two cores.
    ids = fill(connection, messages, tag=f"scale{kind}{count}")
    processes = []
    counter = _RowCounter(rows)
    commands = (
        [
            [
                *WORKER,
                "run",
                "--config",
                str(config),
                "--rows",
                str(workdir / f"rows-{kind}{count}.jsonl"),
                "--processes",
                str(count),
            ]
        ]
        if supervised
        else [[*WORKER, "run", "--config", str(config), "--rows", str(path)] for path in rows]
    )
    logs = logs[: len(commands)]
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as err:
                processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err))
        deadline = time.monotonic() + 60
        while sum(log.read_text().count("worker running") for log in logs) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start within 60 s")
            time.sleep(0.02)
        # Steady state: the clock starts once every worker is up (the first ones may already have
        # taken some requests: those are not counted).
        start, done_at_start = time.perf_counter(), counter.count()
        deadline = time.monotonic() + 900
        # Rows are flushed just before completion, so their count tracks finished work closely.
        while counter.count() < messages:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not finish within 900 s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        for process in processes:
            process.send_signal(signal.SIGTERM)
        cpu = 0.0
        for process, log in zip(processes, logs, strict=True):
            # wait4 gives the child's own CPU time: how much work one message costs a worker.
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            if process.returncode != 0:
                raise RuntimeError(f"worker exited {process.returncode}: {log.read_text()[-2000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return elapsed * messages / max(1, messages - done_at_start), rows, ids, cpu


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _RowCounter:
    """Counts rows written so far, reading only what was appended since the last look (cheap to poll)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._offsets = dict.fromkeys(paths, 0)
        self._total = 0

    def count(self) -> int:
        for path, offset in self._offsets.items():
            try:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                continue
            self._total += chunk.count(b"\n")
            self._offsets[path] = offset + len(chunk)
        return self._total


def check(rows: Sequence[Path], message_ids: Sequence[str]) -> tuple[int, int]:
    """(distinct events, redelivery duplicates); raises if anything was lost or a duplicate differs."""
    seen: dict[str, str] = {}
    duplicates = 0
    for path in rows:
        for line in path.read_text(encoding="utf-8").splitlines():
            event_id = json.loads(line)["EventId"]
            if event_id in seen:
                duplicates += 1
                if seen[event_id] != line:
                    raise AssertionError(f"duplicate {event_id} with different content")
            seen[event_id] = line
    expected = {event_id_for(m) for m in message_ids}
    missing = expected - set(seen)
    if missing or len(seen) != len(expected):
        raise AssertionError(f"lost {len(missing)} events; {len(seen)} distinct for {len(expected)} requests")
    return len(seen), duplicates


def leftovers(connection: str) -> tuple[int, int]:
    """(active, dead-lettered) messages left on the requests queue."""
    with ServiceBusClient.from_connection_string(connection) as client:
        with client.get_queue_receiver(QUEUE) as receiver:
            active = len(receiver.peek_messages(max_message_count=100))
        with client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver:
            dead = len(receiver.peek_messages(max_message_count=100))
    return active, dead


def main(argv: list[str] | None = None) -> int:
    """Run each worker count and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="requests per run (default 20,000)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to compare (default 1,2,4)")
    parser.add_argument("--batch", type=int, default=250, help="AB_WORKER_MAX_BATCH for the workers (default 250)")
    parser.add_argument(
        "--supervised",
        action="store_true",
        help="for each count above 1, also time one `run --processes N` against N independent processes",
    )
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    results: list[tuple[int, float, int, int, float, float]] = []
    supervised: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker, connection = start_broker(workdir)
        try:
            for count in counts:
                broker_before = process_cpu(broker.pid)
                seconds, rows, message_ids, cpu = run_workers(connection, count, workdir, args.batch, args.messages)
                broker_cpu = process_cpu(broker.pid) - broker_before
                distinct, duplicates = check(rows, message_ids)
                active, dead = leftovers(connection)
                if active or dead:
                    raise AssertionError(f"{active} requests left on the queue, {dead} dead-lettered")
                results.append((count, seconds, distinct, duplicates, cpu, broker_cpu))
                print(f"{count} worker(s): {args.messages / seconds:,.0f} msg/s, lost 0, duplicates {duplicates}")
                if args.supervised and count > 1:
                    seconds, rows, message_ids, sup_cpu = run_workers(
                        connection, count, workdir, args.batch, args.messages, supervised=True
                    )
                    check(rows, message_ids)
                    if any(leftovers(connection)):
                        raise AssertionError("requests left on the queue after the supervised run")
                    supervised[count] = seconds
                    print(
                        f"run --processes {count}: {args.messages / seconds:,.0f} msg/s, lost 0,"
                        f" CPU {sup_cpu / args.messages * 1e6:,.0f} µs/msg"
                    )
        finally:
            stop_broker(broker)
    base = args.messages / results[0][1]
    header = f"{'workers':>7}  {'seconds':>8}  {'msg/s':>8}  {'speed-up':>8}  {'events':>7}  {'dups':>5}  lost"
    print(f"\n{header}  worker CPU µs/msg  broker CPU µs/msg")
    for count, seconds, distinct, duplicates, cpu, broker_cpu in results:
        rate = args.messages / seconds
        per_message = cpu / args.messages * 1e6
        print(
            f"{count:>7}  {seconds:>8.2f}  {rate:>8,.0f}  {rate / base:>7.2f}x  {distinct:>7}  {duplicates:>5}     0"
            f"  {per_message:>17,.0f}  {broker_cpu / args.messages * 1e6:>17,.0f}"
        )
    for count, seconds in supervised.items():
        independent = next(s for c, s, *_ in results if c == count)
        print(
            f"run --processes {count}: {args.messages / seconds:,.0f} msg/s = {independent / seconds:.2f}x"
            f" {count} independent processes (target >= 0.90)"
        )
    cpu_per_message = results[0][4] / args.messages
    print(
        f"\nOne worker process costs {cpu_per_message * 1e6:,.0f} µs of CPU per request (start-up included), "
        f"so a replica with one core to itself and a remote broker handles about {1 / cpu_per_message:,.0f} msg/s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
