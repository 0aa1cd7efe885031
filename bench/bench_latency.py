"""The latency a requester sees: ``python -m bench.bench_latency [--rates 5,200] [--seconds S]``.

Runs the embedded broker and one ``ab-worker run`` in their own processes, then, for each arrival
rate, publishes requests at that rate (one sender, each request sent alone, as a service answering
its own traffic would) and measures per request:

* enqueue → event: from just before the send until the assignment event is read back from the
  topic's ``all`` subscription (a prefetching RECEIVE_AND_DELETE reader, so the reader adds little);
* enqueue → reply: until the copy sent to the request's ``reply_to`` queue is read back (the same way);
* enqueue → settlement: until the request's row appears in the ``--rows`` file (rows are flushed
  just before the request is completed, so this tracks settlement to within one flush).

Last, a filled queue: ``--fill`` requests published before the worker starts draining them, for the
throughput a burst sees. Prints p50/p99/max per rate and the targets: p99 enqueue→event ≤ 100 ms at 5
and 200 msg/s; settlement within the flush age + 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceiveMode

from bench.bench_scale import process_cpu
from worker.service.handling import event_id_for

QUEUE, TOPIC, REPLIES = "assignment-requests", "assignment-events", "assignment-replies"
WORKER = [sys.executable, "-m", "worker", "--log-level", "WARNING"]
EXPERIMENTS = {"experiments": [{"id": "exp_bench", "split": {"A": 0.5, "B": 0.5}}]}
BROKER_CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "bench",
                "Queues": [
                    {"Name": QUEUE, "Properties": {"MaxDeliveryCount": 10, "LockDuration": "PT60S"}},
                    {"Name": REPLIES, "Properties": {}},
                ],
                "Topics": [{"Name": TOPIC, "Properties": {}, "Subscriptions": [{"Name": "all", "Properties": {}}]}],
            }
        ]
    }
}


@dataclass
class Timeline:
    """When each request was sent (by message id), its event and reply seen and its row written (by event id)."""

    sent: dict[str, float] = field(default_factory=dict)
    event: dict[str, float] = field(default_factory=dict)
    reply: dict[str, float] = field(default_factory=dict)
    row: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_broker(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """``ab-worker broker`` in a child process, with an ``all`` subscription to read events back."""
    config = workdir / "broker.json"
    config.write_text(json.dumps(BROKER_CONFIG), encoding="utf-8")
    process = subprocess.Popen(
        [*WORKER, "broker", "--port", "0", "--config", str(config)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("Endpoint="):
        process.kill()
        raise RuntimeError(f"broker did not start: {line!r}")
    return process, line


def start_worker(connection: str, workdir: Path, rows: Path) -> subprocess.Popen[bytes]:
    """One ``ab-worker run`` with its default settings, writing rows to ``rows``."""
    config = workdir / "experiments.json"
    config.write_text(json.dumps(EXPERIMENTS), encoding="utf-8")
    env = {**os.environ, "AB_WORKER_SERVICEBUS_CONNECTION_STRING": connection, "AB_WORKER_HEALTH_PORT": "0"}
    log = (workdir / "worker.log").open("w")
    process = subprocess.Popen(
        [*WORKER, "run", "--config", str(config), "--rows", str(rows)], env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    deadline = time.monotonic() + 60
    while "worker running" not in (workdir / "worker.log").read_text():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("worker did not start: " + (workdir / "worker.log").read_text()[-2000:])
        time.sleep(0.02)
    return process


class EventReader(threading.Thread):
    """Reads events from the ``all`` subscription (or replies from the replies queue) and stamps each arrival."""

    def __init__(self, connection: str, timeline: Timeline, *, replies: bool = False) -> None:
        super().__init__(daemon=True)
        self._connection, self._timeline, self._replies = connection, timeline, replies
        self._halt = threading.Event()

    def run(self) -> None:
        seen = self._timeline.reply if self._replies else self._timeline.event
        with ServiceBusClient.from_connection_string(self._connection) as client:
            mode, prefetch = ServiceBusReceiveMode.RECEIVE_AND_DELETE, 500
            receiver = (
                client.get_queue_receiver(REPLIES, receive_mode=mode, prefetch_count=prefetch)
                if self._replies
                else client.get_subscription_receiver(TOPIC, "all", receive_mode=mode, prefetch_count=prefetch)
            )
            with receiver:
                while not self._halt.is_set():
                    for message in receiver.receive_messages(max_message_count=1, max_wait_time=0.5):
                        now = time.perf_counter()
                        with self._timeline.lock:
                            seen.setdefault(str(message.message_id), now)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class RowWatcher(threading.Thread):
    """Polls the rows file every millisecond and stamps when each event's row appeared."""

    def __init__(self, path: Path, timeline: Timeline) -> None:
        super().__init__(daemon=True)
        self._path, self._timeline = path, timeline
        self._halt = threading.Event()

    def run(self) -> None:
        offset, partial = 0, b""
        while not self._halt.is_set():
            try:
                with self._path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                chunk = b""
            now = time.perf_counter()
            if chunk:
                offset += len(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                with self._timeline.lock:
                    for line in lines:
                        self._timeline.row.setdefault(json.loads(line)["EventId"], now)
            self._halt.wait(0.001)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def body(message_id: str) -> bytes:
    return json.dumps({"user_id": message_id, "experiment_id": "exp_bench"}).encode()


def trickle(connection: str, rate: float, seconds: float, tag: str, timeline: Timeline) -> list[str]:
    """Send one request at a time at ``rate`` per second for ``seconds``; returns the message ids."""
    ids = [f"{tag}-{i}" for i in range(max(1, round(rate * seconds)))]
    with ServiceBusClient.from_connection_string(connection) as client, client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(ServiceBusMessage(b"{}", message_id=f"{tag}-warmup"))  # opens the link
        start = time.perf_counter()
        for i, message_id in enumerate(ids):
            due = start + i / rate
            while (pause := due - time.perf_counter()) > 0:
                time.sleep(pause)
            stamp = time.perf_counter()
            sender.send_messages(ServiceBusMessage(body(message_id), message_id=message_id, reply_to=REPLIES))
            timeline.sent[message_id] = stamp
    return ids


def wait_for_all(ids: Sequence[str], timeline: Timeline, timeout: float = 120.0, *, replies: bool = True) -> None:
    """Until every request's event, reply (unless ``replies`` is false) and row were seen."""
    deadline = time.monotonic() + timeout
    events = {event_id_for(m) for m in ids}
    while True:
        with timeline.lock:
            done = events <= timeline.event.keys() and events <= timeline.row.keys()
            done = done and (not replies or events <= timeline.reply.keys())
        if done:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("not every request was answered within the timeout")
        time.sleep(0.05)


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3


def latencies(ids: Sequence[str], timeline: Timeline) -> tuple[list[float], list[float], list[float]]:
    """Per request: (enqueue → event, enqueue → reply, enqueue → row)."""
    to_event = [timeline.event[event_id_for(m)] - timeline.sent[m] for m in ids]
    to_reply = [timeline.reply[event_id_for(m)] - timeline.sent[m] for m in ids]
    to_row = [timeline.row[event_id_for(m)] - timeline.sent[m] for m in ids]
    return to_event, to_reply, to_row


def filled_queue(connection: str, count: int, timeline: Timeline, worker: subprocess.Popen[bytes]) -> float:
    """Pause the worker, fill the queue with ``count`` requests, resume it; its drain rate in msg/s."""
    ids = [f"fill-{i}" for i in range(count)]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        with ServiceBusClient.from_connection_string(connection) as client, client.get_queue_sender(QUEUE) as sender:
            for start in range(0, count, 500):
                batch = sender.create_message_batch()
                for message_id in ids[start : start + 500]:
                    batch.add_message(ServiceBusMessage(body(message_id), message_id=message_id))
                sender.send_messages(batch)
    finally:
        began = time.perf_counter()
        os.kill(worker.pid, signal.SIGCONT)
    wait_for_all(ids, timeline, timeout=600, replies=False)
    with timeline.lock:
        # Until the last event, as a requester sees it: the last rows are settled up to the flush age later.
        last = max(timeline.event[event_id_for(m)] for m in ids)
    return count / (last - began)


def main(argv: list[str] | None = None) -> int:
    """Measure each rate, then the filled queue, and print the table with its targets."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="5,200", help="arrival rates in requests per second (default 5,200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each rate is sustained (default 10)")
    parser.add_argument("--fill", type=int, default=10_000, help="requests in the filled-queue run (default 10,000)")
    parser.add_argument(
        "--flush-age", type=float, default=2.0, help="the flush age the worker runs with (for the target)"
    )
    args = parser.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    timeline = Timeline()
    Percentiles = tuple[float, float, float]
    rows_out: list[tuple[str, Percentiles, Percentiles, Percentiles]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker, connection = start_broker(workdir)
        rows = workdir / "rows.jsonl"
        worker = start_worker(connection, workdir, rows)
        readers = [EventReader(connection, timeline), EventReader(connection, timeline, replies=True)]
        watcher = RowWatcher(rows, timeline)
        threads: list[EventReader | RowWatcher] = [*readers, watcher]
        for thread in threads:
            thread.start()
        try:
            # One answered request first: the worker opens its topic and reply links on its first event
            # (about 0.5 s each on the embedded broker), a once-per-process cost, not a running worker's latency.
            wait_for_all(trickle(connection, 1, 1, "warmup", timeline), timeline)
            for rate in rates:
                ids = trickle(connection, rate, args.seconds, f"r{rate:g}", timeline)
                wait_for_all(ids, timeline)
                to_event, to_reply, to_row = latencies(ids, timeline)
                rows_out.append((f"{rate:g} msg/s", percentiles(to_event), percentiles(to_reply), percentiles(to_row)))
                print(f"{rate:g} msg/s: {len(ids)} requests measured", flush=True)
            cpu_before = process_cpu(worker.pid)
            throughput = filled_queue(connection, args.fill, timeline, worker)
            cpu = process_cpu(worker.pid) - cpu_before
        finally:
            for thread in threads:
                thread.stop()
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
            broker.terminate()
            broker.wait(10)
    print(
        f"\n{'arrivals':>12}  {'→ event p50':>11}  {'p99':>8}  {'max':>8}  {'→ reply p50':>11}  {'p99':>8}"
        f"  {'→ settled p50':>13}  {'p99':>8}  {'max':>8}"
    )
    for label, (e50, e99, emax), (p50, p99, _), (r50, r99, rmax) in rows_out:
        print(
            f"{label:>12}  {e50:>9.1f}ms  {e99:>6.1f}ms  {emax:>6.0f}ms  {p50:>9.1f}ms  {p99:>6.1f}ms"
            f"  {r50:>11.1f}ms  {r99:>6.0f}ms  {rmax:>6.0f}ms"
        )
    print(
        f"\nfilled queue: {args.fill:,} requests drained at {throughput:,.0f} msg/s"
        f" ({cpu / args.fill * 1e6:,.0f} µs CPU each)"
    )
    worst_event = max(e99 for _, (_, e99, _), _, _ in rows_out)
    worst_row = max(rmax for _, _, _, (_, _, rmax) in rows_out)
    print(
        f"target p99 enqueue→event ≤ 100 ms: {'met' if worst_event <= 100 else 'NOT met'}"
        f" (worst p99 {worst_event:.1f} ms; stretch ≤ 20 ms: {'met' if worst_event <= 20 else 'not met'})"
    )
    limit = (args.flush_age + 1) * 1e3
    print(
        f"target settlement ≤ flush age + 1 s: {'met' if worst_row <= limit else 'NOT met'} (worst {worst_row:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
