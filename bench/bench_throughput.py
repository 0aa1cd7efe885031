"""Worker throughput against a bare azure-servicebus loop, side by side: ``python -m bench.bench_throughput``.

Runs the embedded broker in its own process (so it does not share the GIL with what is measured),
then, interleaved for ``--rounds`` rounds over the same number of requests:

* ``bare``   — a bare SDK loop: ``receive_messages`` in PEEK_LOCK + ``complete_message`` per message, as
  fast as the SDK allows (nothing decoded, nothing published);
* ``worker`` — the real pump end to end: decode, validate, assign, publish every event to the topic in
  batches, append every row to a file and flush it, then complete.

Both are timed in steady state: the clock starts after the first batch (link setup costs the SDK
about 0.45 s per link, once) and the rate is extrapolated over the remaining messages.

Prints both rates (median of rounds) and their ratio. Target: the worker reaches >= 90% of the bare loop.

``--allocation`` instead runs the real pump twice per round, side by side over identical requests
(each with a three-key context) that differ only in the experiment they name:

* ``plain``        — an experiment with none of the allocation fields (the seed rule alone);
* ``full-featured`` — targeting with three conditions, a holdout, a layer slice, coverage and ten
  overrides (``bench.bench_allocation.FULL``).

Prints both rates (median of rounds) and their ratio. Target: full-featured >= 90% of plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceiveMode

from adapters.files import JsonLinesSink
from adapters.servicebus import ServiceBusAuth, create_client, send_requests
from worker.bootstrap import bootstrap
from worker.domain.registry import ExperimentRegistry
from worker.service.pump import PumpConfig
from worker.service.settings import WorkerSettings

QUEUE, TOPIC = "assignment-requests", "assignment-events"
REGISTRY = ExperimentRegistry.from_dict({"experiments": [{"id": "exp_bench", "split": {"A": 0.5, "B": 0.5}}]})
BROKER_CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "bench",
                "Queues": [{"Name": QUEUE, "Properties": {"MaxDeliveryCount": 10, "LockDuration": "PT60S"}}],
                # No subscription: events are accepted and dropped, like a topic nobody reads yet.
                "Topics": [{"Name": TOPIC, "Properties": {}, "Subscriptions": []}],
            }
        ]
    }
}


def start_broker(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """``ab-worker broker`` in a child process; returns it and its connection string."""
    config = workdir / "broker.json"
    config.write_text(json.dumps(BROKER_CONFIG), encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--log-level", "WARNING", "broker", "--port", "0", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("Endpoint="):
        process.kill()
        raise RuntimeError(f"broker did not start: {line!r}")
    return process, line


def stop_broker(process: subprocess.Popen[str]) -> None:
    """Terminate the broker process and release its pipe."""
    process.terminate()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def fill(
    connection: str, count: int, tag: str = "", experiment: str = "exp_bench", context: dict[str, object] | None = None
) -> list[str]:
    """Publish ``count`` requests with explicit message ids through one sender; returns the ids."""
    tag = tag or f"{time.time_ns()}"
    ids = [f"{tag}-{i}" for i in range(count)]
    extra = {"context": context} if context else {}
    bodies = [json.dumps({"user_id": f"U{i}", "experiment_id": experiment, **extra}).encode() for i in range(count)]
    with ServiceBusClient.from_connection_string(connection) as client:
        # One sender for everything: opening a link costs the SDK about 0.5 s each time.
        send_requests(client, QUEUE, bodies, message_ids=ids)
    return ids


def bare_loop(connection: str, count: int, batch: int, prefetch: int) -> float:
    """Seconds for a bare receive + complete loop over ``count`` messages."""
    with (
        ServiceBusClient.from_connection_string(connection) as client,
        client.get_queue_receiver(
            QUEUE, receive_mode=ServiceBusReceiveMode.PEEK_LOCK, prefetch_count=prefetch
        ) as receiver,
    ):
        done, start = 0, 0.0
        while done < count:
            for message in receiver.receive_messages(max_message_count=batch, max_wait_time=5):
                receiver.complete_message(message)
                done += 1
            if not start:
                # Steady state only: the clock starts once the link is open and the first batch is done.
                start, first = time.perf_counter(), done
        return (time.perf_counter() - start) * count / (count - first)


def bare_publish_loop(connection: str, count: int, batch: int, prefetch: int) -> float:
    """Seconds for the apples-to-apples bare loop: receive, publish one event per message, complete each.

    What a hand-written consumer on the SDK would do for the same job (without decoding or assigning):
    one ``send_messages`` of one event per request, then ``complete_message``.
    """
    with (
        ServiceBusClient.from_connection_string(connection) as client,
        client.get_queue_receiver(
            QUEUE, receive_mode=ServiceBusReceiveMode.PEEK_LOCK, prefetch_count=prefetch
        ) as receiver,
        client.get_topic_sender(TOPIC) as sender,
    ):
        done, start = 0, 0.0
        while done < count:
            for message in receiver.receive_messages(max_message_count=batch, max_wait_time=5):
                sender.send_messages(
                    ServiceBusMessage(b"".join(message.body), message_id=f"event-{message.message_id}")
                )
                receiver.complete_message(message)
                done += 1
            if not start:
                start, first = time.perf_counter(), done
        return (time.perf_counter() - start) * count / (count - first)


def worker_run(
    connection: str, count: int, batch: int, prefetch: int, rows: Path, *, registry: ExperimentRegistry = REGISTRY
) -> float:
    """Seconds for the pump to process ``count`` requests end to end."""
    client = create_client(ServiceBusAuth(connection_string=connection))
    pump = bootstrap(
        WorkerSettings.model_construct(queue_name=QUEUE, topic_name=TOPIC, prefetch=prefetch),
        client=client,
        # Rows flush per batch (by size) or, for a last partial batch, after 0.1 s rather than the default
        # 2 s age: the run ends when everything is settled, and its tail should not be the flush age.
        sink=JsonLinesSink(rows, max_rows=batch, max_age=0.1),
        registry=lambda: registry,
        config=PumpConfig(max_batch=batch, max_wait=5),
    )
    start, first = 0.0, 0
    while pump.stats.completed < count:
        pump.run_once()
        if not start and pump.stats.completed:
            # As for the bare loop: receiver and sender links are open once the first batch is done.
            start, first = time.perf_counter(), pump.stats.completed
    elapsed = (time.perf_counter() - start) * count / (count - first)
    pump.drain()
    client.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print rates and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000, help="requests per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--batch", type=int, default=100, help="receive batch size (default 100)")
    parser.add_argument("--prefetch", type=int, default=300, help="receiver prefetch (default 300)")
    parser.add_argument(
        "--allocation", action="store_true", help="plain against full-featured experiments instead of bare loops"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("AB_WORKER_HEALTH_PORT", "0")
    if args.allocation:
        return allocation_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        broker, connection = start_broker(Path(tmp))
        try:
            times: dict[str, list[float]] = {"bare": [], "bare_publish": [], "worker": []}
            for round_ in range(args.rounds):
                fill(connection, args.messages)
                times["bare"].append(bare_loop(connection, args.messages, args.batch, args.prefetch))
                fill(connection, args.messages)
                times["bare_publish"].append(bare_publish_loop(connection, args.messages, args.batch, args.prefetch))
                fill(connection, args.messages)
                rows = Path(tmp) / f"rows-{round_}.jsonl"
                times["worker"].append(worker_run(connection, args.messages, args.batch, args.prefetch, rows))
                assert sum(1 for _ in rows.open()) == args.messages, "every row was written"
                rates = {k: args.messages / v[-1] for k, v in times.items()}
                print(
                    f"round {round_ + 1}: bare {rates['bare']:,.0f} msg/s, bare+publish {rates['bare_publish']:,.0f}"
                    f" msg/s, worker {rates['worker']:,.0f} msg/s"
                )
        finally:
            stop_broker(broker)
    bare = args.messages / statistics.median(times["bare"])
    worker = args.messages / statistics.median(times["worker"])
    twin = args.messages / statistics.median(times["bare_publish"])
    ratio, twin_ratio = worker / bare, worker / twin
    print(f"\n{args.messages:,} messages x {args.rounds} rounds, batch {args.batch}, prefetch {args.prefetch}")
    print(f"bare SDK receive+complete loop:           {bare:>8,.0f} msg/s")
    print(f"bare SDK receive+publish+complete loop:   {twin:>8,.0f} msg/s")
    print(f"worker end to end:                        {worker:>8,.0f} msg/s")
    print(f"ratio worker / bare receive+complete: {ratio:.2f} (target >= 0.90)  {'PASS' if ratio >= 0.9 else 'MISS'}")
    print(
        f"ratio worker / bare receive+publish+complete: {twin_ratio:.2f} (target >= 1.40)"
        f"  {'PASS' if twin_ratio >= 1.4 else 'MISS'}"
    )
    return 0


def allocation_main(args: argparse.Namespace) -> int:
    """The pump over a plain and a full-featured experiment, interleaved; rates and their ratio."""
    # Imported here, not at the top: it loads scipy, whose objects would slow every garbage collection
    # of the default comparison (measured: about 10% more CPU per message in the pump).
    from bench.bench_allocation import CONTEXT, FULL

    registry = ExperimentRegistry.from_dict(FULL)
    names = {"plain": "exp_plain", "full-featured": "exp_full"}
    times: dict[str, list[float]] = {name: [] for name in names}
    #: CPU seconds of this process per run (the pump and its SDK threads): less moved by a busy machine.
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        broker, connection = start_broker(Path(tmp))
        try:
            for round_ in range(args.rounds):
                # Alternate which goes first, so neither always runs on a warmer (or busier) machine.
                for name in names if round_ % 2 == 0 else reversed(names):
                    fill(connection, args.messages, experiment=names[name], context=CONTEXT)
                    rows = Path(tmp) / f"rows-{name}-{round_}.jsonl"
                    started = time.process_time()
                    elapsed = worker_run(connection, args.messages, args.batch, args.prefetch, rows, registry=registry)
                    cpu[name].append(time.process_time() - started)
                    times[name].append(elapsed)
                    assert sum(1 for _ in rows.open()) == args.messages, "every row was written"
                rates = {k: args.messages / v[-1] for k, v in times.items()}
                print(
                    f"round {round_ + 1}: plain {rates['plain']:,.0f} msg/s, "
                    f"full-featured {rates['full-featured']:,.0f} msg/s"
                )
        finally:
            stop_broker(broker)
    plain = args.messages / statistics.median(times["plain"])
    full = args.messages / statistics.median(times["full-featured"])
    ratio = full / plain
    per = {name: statistics.median(values) / args.messages * 1e6 for name, values in cpu.items()}
    print(f"\n{args.messages:,} messages x {args.rounds} rounds, batch {args.batch}, prefetch {args.prefetch}")
    print(f"worker, plain experiment:          {plain:>8,.0f} msg/s  {per['plain']:>6.1f} µs CPU/msg")
    print(f"worker, full-featured experiment:  {full:>8,.0f} msg/s  {per['full-featured']:>6.1f} µs CPU/msg")
    print(f"ratio full-featured / plain: {ratio:.2f} (target >= 0.90)  {'PASS' if ratio >= 0.9 else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
