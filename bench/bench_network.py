"""Worker throughput with real network latency, side by side: ``python -m bench.bench_network``.

Localhost hides round trips; in Azure each one costs milliseconds, and every batch needs several
(receive, publish, settle). This runs the embedded broker in its own process and, for each one-way
delay (default 0, 2 and 10 ms), a TCP proxy in its own process (:mod:`adapters.local.faultproxy`)
adding that delay to every chunk in each direction. Interleaved for ``--rounds`` rounds, the real
pump (as in :mod:`bench.bench_throughput`: decode, assign, publish every event, write every row,
settle) is timed in steady state through each proxy, plus once straight to the broker.

Prints medians and the ratio to the 0 ms proxy. Target (issue 12 §2): with 2 ms each way, >= 80% of
the no-delay throughput; the 10 ms figure is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_throughput import fill, start_broker, stop_broker, worker_run


def start_proxy(upstream_port: int, delay: float) -> tuple[subprocess.Popen[str], int]:
    """``python -m adapters.local.faultproxy`` in a child process; returns it and its port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapters.local.faultproxy",
            "--upstream-port",
            str(upstream_port),
            "--delay",
            str(delay),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("port="):
        process.kill()
        raise RuntimeError(f"proxy did not start: {line!r}")
    return process, int(line.removeprefix("port="))


def stop_proxy(process: subprocess.Popen[str]) -> None:
    """Close its stdin (it exits) and reap it."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def broker_port(connection: str) -> int:
    """The port in an emulator connection string ``Endpoint=sb://127.0.0.1:PORT;...``."""
    return int(connection.split("sb://", 1)[1].split(";", 1)[0].rsplit(":", 1)[1])


def main(argv: list[str] | None = None) -> int:
    """Run every delay interleaved and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000, help="requests per run (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--batch", type=int, default=100, help="receive batch size (default 100)")
    parser.add_argument("--prefetch", type=int, default=0, help="receiver prefetch (default 0, the worker's default)")
    parser.add_argument("--delays", default="0,2,10", help="one-way delays in ms (default 0,2,10)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AB_WORKER_HEALTH_PORT", "0")
    delays = [float(d) for d in args.delays.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        broker, connection = start_broker(Path(tmp))
        port = broker_port(connection)
        proxies = {d: start_proxy(port, d / 1000) for d in delays}
        targets = {"direct": connection}
        for d, (_, proxy_port) in proxies.items():
            targets[f"{d:g} ms"] = connection.replace(f":{port};", f":{proxy_port};")
        times: dict[str, list[float]] = {name: [] for name in targets}
        try:
            for round_ in range(args.rounds):
                rates = []
                for name, target in targets.items():
                    fill(connection, args.messages)
                    rows = Path(tmp) / f"rows-{round_}-{name.replace(' ', '')}.jsonl"
                    times[name].append(worker_run(target, args.messages, args.batch, args.prefetch, rows))
                    rates.append(f"{name} {args.messages / times[name][-1]:,.0f}")
                print(f"round {round_ + 1}: " + ", ".join(rates) + " msg/s", flush=True)
        finally:
            for process, _ in proxies.values():
                stop_proxy(process)
            stop_broker(broker)
    rate = {name: args.messages / statistics.median(t) for name, t in times.items()}
    base = rate[f"{delays[0]:g} ms"]
    print(f"\n{args.messages:,} messages x {args.rounds} rounds, batch {args.batch}, prefetch {args.prefetch}; medians")
    for name, value in rate.items():
        label = "direct (no proxy)" if name == "direct" else f"{name} each way"
        print(f"{label:>18}: {value:>7,.0f} msg/s  {value / base:.2f}x")
    if 2.0 in delays and delays[0] == 0:
        ratio = rate["2 ms"] / base
        print(f"2 ms each way / no delay: {ratio:.2f} (target >= 0.80)  {'PASS' if ratio >= 0.8 else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
