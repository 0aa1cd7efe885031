"""``ab-worker broker`` and ``ab-worker publish``: the embedded broker, and requests sent through the SDK.

Handlers import adapters lazily, so ``ab-worker --help`` stays fast and ``worker/`` keeps no
import-time dependency on Azure SDKs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from worker import bootstrap
from worker.cli.common import (
    EXIT_OK,
    ExitStatus,
    Subcommands,
    activation_hint,
    broker_id,
    check_input,
    formatter,
    integer,
    listen_error,
    port,
    print_err,
    runnable_program,
    servicebus_client,
)
from worker.domain.errors import UsageError
from worker.domain.plural import counted
from worker.service.signals import on_signals

if TYPE_CHECKING:
    from adapters.servicebus import Client as ServiceBusClient


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the embedded broker in the foreground until SIGTERM (exit 0) or Ctrl-C (exit 130)."""
    stop = threading.Event()
    with ExitStack() as stack:
        try:
            broker = stack.enter_context(
                bootstrap.local_broker(args.port, host=args.host, config=Path(args.config) if args.config else None)
            )
        except OSError as exc:
            raise listen_error(exc, f"{args.host}:{args.port}", "--port") from None
        received = stack.enter_context(on_signals(lambda signum: stop.set()))
        print(broker.connection_string, flush=True)
        print_err(how_to_use(broker.connection_string))
        while not stop.wait(0.5):  # a timed wait: the main thread runs signal handlers between waits
            pass
    return ExitStatus.INTERRUPTED if signal.SIGINT in received else EXIT_OK


def how_to_use(connection_string: str) -> str:
    """The lines to paste in another terminal to use this broker (on stderr: stdout is the string alone)."""
    hint = activation_hint() if runnable_program() != "ab-worker" else None
    paste = [hint] if hint else []
    paste.append(f"export AB_WORKER_SERVICEBUS_CONNECTION_STRING={shlex.quote(connection_string)}")
    return "\n".join(
        [
            "embedded Service Bus broker running (Ctrl-C stops it). To use it, paste in another terminal:",
            *(f"  {line}" for line in paste),
            "Then every ab-worker command there talks to this broker, and `make run` runs its demo here,",
            "so the demo's dead letters stay for `ab-worker dlq peek` and `dlq replay`.",
        ]
    )


# -- publish --------------------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish one request from flags, or every line of a JSON-lines file, through the real SDK."""
    from adapters.servicebus import RequestProperties, send_requests

    if bool(args.file) == bool(args.user):
        raise UsageError("give either --user (with --experiment) or --file FILE")
    if args.reply_to_session_id and not args.reply_to:
        raise UsageError("--reply-to-session-id needs --reply-to")
    if args.file:
        if args.message_id:
            # One id on different bodies would give their events one id: duplicate detection keeps the first.
            raise UsageError("--message-id names one request; it cannot go with --file (each line gets its own id)")
        path = check_input(Path(args.file))
        bodies = [line.rstrip(b"\r\n") for line in path.open("rb") if line.strip()]
    else:
        bodies = [_request_body(args)] * args.count
    client, settings = servicebus_client()
    queue = args.queue or settings.queue_name
    properties = RequestProperties(
        reply_to=_reply_to(args.reply_to, client, queue),
        reply_to_session_id=args.reply_to_session_id,
        correlation_id=args.correlation_id,
        session_id=args.session_id,
    )
    message_ids = [args.message_id] * len(bodies) if args.message_id else None
    with client:
        sent = send_requests(client, queue, bodies, message_ids=message_ids, properties=properties)
    replies = f"; replies to {args.reply_to!r}" if args.reply_to else ""
    print(f"published {counted(sent, 'request')} to {queue!r}{replies}", file=sys.stderr)
    return EXIT_OK


def _request_body(args: argparse.Namespace) -> bytes:
    if not args.experiment:
        raise UsageError("--user needs --experiment")
    body: dict[str, object] = {"user_id": args.user, "experiment_id": args.experiment}
    if args.segment:
        body["segment"] = args.segment
    if args.context:
        from schemas.models import finite_json_float, refuse_json_constant

        try:
            context = json.loads(args.context, parse_constant=refuse_json_constant, parse_float=finite_json_float)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--context is not JSON: {exc.msg}") from None
        except ValueError as exc:  # NaN, Infinity, 1e400: the worker would dead-letter the request as InvalidJson
            raise UsageError(f"--context is not JSON the worker accepts: {exc}") from None
        if not isinstance(context, dict):
            raise UsageError("--context must be a JSON object")
        body["context"] = context
    return json.dumps(body).encode()


def _reply_to(reply_to: str | None, client: ServiceBusClient, queue: str) -> str | None:
    """``--reply-to`` checked by the worker's own rule, so a request is never sent only to be dead-lettered."""
    from adapters.servicebus import reply_entity
    from worker.domain.errors import PermanentError

    if reply_to is None:
        return None
    try:
        reply_entity(reply_to, str(client.fully_qualified_namespace), queue)
    except PermanentError as exc:
        raise UsageError(exc.description.replace("reply_to ", "--reply-to ", 1)) from None
    return reply_to


def add_commands(commands: Subcommands) -> None:
    """Register ``broker`` and ``publish``."""
    broker = commands.add_parser(
        "broker",
        help="run the embedded Service Bus broker (AMQP on 127.0.0.1)",
        formatter_class=formatter,
        description=(
            "Run the embedded Service Bus stand-in in the foreground: its connection string on stdout,\n"
            "and on stderr the lines to paste in another terminal to use it."
        ),
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
            "  ab-worker publish --file deploy/sample-requests.jsonl\n"
            "  ab-worker publish --experiment exp_001 --user U123 --reply-to assignment-replies \\\n"
            "      --message-id ask-1 --correlation-id order-77\n\n"
            "Lines of --file are sent as they are (malformed ones included, to exercise dead-lettering).\n"
            "--reply-to: the worker also sends the request's event to this queue (request/reply); it is\n"
            "checked by the worker's rule (a queue or topic of this namespace, not the requests queue).\n"
            "--message-id, --correlation-id, --session-id, --reply-to-session-id: 1-128 characters, no\n"
            "control or invisible characters. The event's id is derived from the message id, and its\n"
            "correlation id is --correlation-id, else the message id."
        ),
    )
    publish.add_argument("--experiment", help="experiment id")
    publish.add_argument("--user", help="user id")
    publish.add_argument("--segment", help="segment")
    publish.add_argument("--context", help="context as a JSON object")
    publish.add_argument("--count", type=integer(1), default=1, help="send the request this many times (default 1)")
    publish.add_argument("--file", help="JSON-lines file: one request body per line")
    publish.add_argument("--queue", help="queue (default AB_WORKER_QUEUE_NAME)")
    publish.add_argument("--reply-to", metavar="ENTITY", help="queue (or topic) the event is also sent to")
    publish.add_argument("--correlation-id", metavar="ID", type=broker_id, help="correlation id (copied to the event)")
    publish.add_argument("--message-id", metavar="ID", type=broker_id, help="message id (default: one per message)")
    publish.add_argument("--session-id", metavar="ID", type=broker_id, help="session id (session-enabled queues)")
    publish.add_argument(
        "--reply-to-session-id", metavar="ID", type=broker_id, help="session of the reply (with --reply-to)"
    )
    publish.set_defaults(func=cmd_publish)
