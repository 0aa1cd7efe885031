"""``ab-worker events tail``: watch the assignment events on a subscription of the events topic.

Handlers import adapters lazily, so ``ab-worker --help`` stays fast and ``worker/`` keeps no
import-time dependency on Azure SDKs.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from worker.cli.common import EXIT_OK, Subcommands, formatter, integer, positive_number, servicebus_client
from worker.cli.dlq import json_line, printable
from worker.domain.plural import counted

if TYPE_CHECKING:
    from adapters.servicebus import TailedEvent

#: The subscription ``events tail`` reads unless told otherwise (the default broker and Config.json have it).
DEFAULT_SUBSCRIPTION = "all"


def cmd_events_tail(args: argparse.Namespace) -> int:
    """Print events as they arrive on a subscription (consuming them from it) until --count, --idle or Ctrl-C."""
    from adapters.servicebus import read_events

    client, settings = servicebus_client()
    topic = args.topic or settings.topic_name
    where = f"{topic}/Subscriptions/{args.subscription}"
    as_json = args.json or not sys.stdout.isatty()

    def wanted(event: TailedEvent) -> bool:
        return args.experiment is None or event.experiment_id == args.experiment

    def opened() -> None:
        print(f"reading events from {where} (each one read is consumed from that subscription)", file=sys.stderr)

    shown = 0
    with client:
        events = read_events(
            client, topic, args.subscription, keep=wanted, limit=args.count, idle_seconds=args.idle, on_open=opened
        )
        for event in events:
            print(_json(event) if as_json else _line(event), flush=True)
            shown += 1
    print(f"read {counted(shown, 'event')} from {where}", file=sys.stderr)
    return EXIT_OK


def _json(event: TailedEvent) -> str:
    """The event body as one JSON line (the body as text when it is not a JSON object)."""
    body = event.event or {"body": event.body.decode("utf-8", "replace")}
    return json_line(body)


def _line(event: TailedEvent) -> str:
    """One readable line per event, every field escaped for the terminal."""
    fields = event.event
    when = event.enqueued_time.strftime("%Y-%m-%d %H:%M:%S") if event.enqueued_time else "-"
    segment = f" [{printable(fields['segment'])}]" if fields.get("segment") else ""
    return (
        f"{when}  {printable(event.experiment_id)}{segment}  {printable(fields.get('user_id'))}"
        f" → {printable(fields.get('variant_id'))}  (correlation {printable(event.correlation_id)},"
        f" event {printable(event.message_id)})"
    )


def add_commands(commands: Subcommands) -> None:
    """Register ``events tail``."""
    events = commands.add_parser(
        "events",
        help="watch assignment events on the events topic",
        formatter_class=formatter,
        description="Events-topic operations for publishers and subscribers.",
    )
    actions = events.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    tail = actions.add_parser(
        "tail",
        help="print events as they arrive on a subscription (consumes from it)",
        formatter_class=formatter,
        description=(
            "Print assignment events as they arrive on a subscription of the events topic, until\n"
            "--count events were printed, --idle seconds pass with none, or Ctrl-C (exit 130).\n\n"
            "A subscription is its reader's own copy of the topic: tail consumes every event it reads\n"
            "from that subscription (an event --experiment filters out too), and nothing from the topic\n"
            f"or any other subscription. The default, {DEFAULT_SUBSCRIPTION!r}, exists for watching; do not tail a\n"
            "subscription a service reads. An event is consumed only after it was printed."
        ),
        epilog=(
            "examples:\n"
            "  ab-worker events tail\n"
            "  ab-worker events tail --experiment exp_001 --count 10\n"
            "  ab-worker events tail --json --idle 5 | jq .variant_id"
        ),
    )
    tail.add_argument(
        "--subscription", default=DEFAULT_SUBSCRIPTION, help=f"subscription to read (default {DEFAULT_SUBSCRIPTION})"
    )
    tail.add_argument("--topic", help="events topic (default AB_WORKER_TOPIC_NAME)")
    tail.add_argument("--experiment", help="print only events of this experiment")
    tail.add_argument("--count", type=integer(1), help="stop after printing this many events")
    tail.add_argument("--idle", type=positive_number, metavar="SECONDS", help="stop after this long with no event")
    tail.add_argument(
        "--json", action="store_true", help="one event body per line (the default when stdout is not a terminal)"
    )
    tail.set_defaults(func=cmd_events_tail)
