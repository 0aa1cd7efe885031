"""``ab-worker broker`` and ``ab-worker publish``: the embedded broker, and requests sent through the SDK.

Handlers import adapters lazily, so ``ab-worker --help`` stays fast and ``worker/`` keeps no
import-time dependency on Azure SDKs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from worker.cli.common import EXIT_OK, check_input, formatter, integer, listen_error, port, servicebus_client
from worker.domain.errors import ConfigurationError, UsageError


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the embedded broker in the foreground until SIGTERM (exit 0) or Ctrl-C (exit 130)."""
    try:
        from adapters.local.broker import BrokerConfig, BrokerConfigError, LocalBroker
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the embedded broker is development tooling and not installed here ({exc.name} is missing):"
            " from a source checkout, `make install` or `pip install -e '.[local]'`"
        ) from None
    try:
        config = BrokerConfig.load(Path(args.config)) if args.config else BrokerConfig.default()
    except BrokerConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        broker = LocalBroker(config, host=args.host, port=args.port).start()
    except OSError as exc:
        raise listen_error(exc, f"{args.host}:{args.port}", "--port") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        print(broker.connection_string, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        broker.stop()
    return EXIT_OK


# -- publish --------------------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish one request from flags, or every line of a JSON-lines file, through the real SDK."""
    from adapters.servicebus import send_requests

    if bool(args.file) == bool(args.user):
        raise UsageError("give either --user (with --experiment) or --file FILE")
    if args.file:
        path = check_input(Path(args.file))
        bodies = [line.rstrip(b"\r\n") for line in path.open("rb") if line.strip()]
    else:
        if not args.experiment:
            raise UsageError("--user needs --experiment")
        body: dict[str, Any] = {"user_id": args.user, "experiment_id": args.experiment}
        if args.segment:
            body["segment"] = args.segment
        if args.context:
            try:
                context = json.loads(args.context)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--context is not JSON: {exc.msg}") from None
            if not isinstance(context, dict):
                raise UsageError("--context must be a JSON object")
            body["context"] = context
        bodies = [json.dumps(body).encode()] * args.count
    client, settings = servicebus_client()
    with client:
        sent = send_requests(client, args.queue or settings.queue_name, bodies)
    print(f"published {sent} requests to {args.queue or settings.queue_name!r}", file=sys.stderr)
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Register ``broker`` and ``publish``."""
    broker = commands.add_parser(
        "broker",
        help="run the embedded Service Bus broker (AMQP on 127.0.0.1)",
        formatter_class=formatter,
        description="Run the embedded Service Bus stand-in in the foreground and print its connection string.",
        epilog=(
            "examples:\n"
            "  ab-worker broker --port 5672\n"
            "  export AB_WORKER_SERVICEBUS_CONNECTION_STRING='<the printed string>'\n"
            "  ab-worker run --config deploy/experiments.yaml\n\n"
            "--config takes the official emulator's Config.json shape (deploy/servicebus-emulator/Config.json)."
        ),
    )
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    broker.add_argument("--port", type=port, default=5672, help="port (default 5672; 0 picks a free one)")
    broker.add_argument("--config", help="entities file in the official emulator's Config.json shape")
    broker.set_defaults(func=cmd_broker)

    publish = commands.add_parser(
        "publish",
        help="publish assignment requests to the queue",
        formatter_class=formatter,
        description="Publish requests through the real azure-servicebus SDK, as another service would.",
        epilog=(
            "examples:\n"
            "  ab-worker publish --experiment exp_001 --user U123\n"
            '  ab-worker publish --experiment exp_001 --user U123 --context \'{"campaign": "c1"}\' --count 10\n'
            "  ab-worker publish --file deploy/sample-requests.jsonl\n\n"
            "Lines of --file are sent as they are (malformed ones included, to exercise dead-lettering)."
        ),
    )
    publish.add_argument("--experiment", help="experiment id")
    publish.add_argument("--user", help="user id")
    publish.add_argument("--segment", help="segment")
    publish.add_argument("--context", help="context as a JSON object")
    publish.add_argument("--count", type=integer(1), default=1, help="send the request this many times (default 1)")
    publish.add_argument("--file", help="JSON-lines file: one request body per line")
    publish.add_argument("--queue", help="queue (default AB_WORKER_QUEUE_NAME)")
    publish.set_defaults(func=cmd_publish)
