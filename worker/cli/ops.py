"""Operator commands: ``broker``, ``publish`` and ``dlq peek|export|replay``.

Part of the composition root: handlers import adapters lazily, so ``ab-worker --help`` stays fast and
``worker/`` keeps no import-time dependency on Azure SDKs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker.domain.errors import UsageError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _client() -> Any:
    from worker.cli import _settings
    from worker.service import bootstrap as compose

    settings = _settings()
    if settings.servicebus_connection_string is None and settings.servicebus_namespace is None:
        raise UsageError(
            "no Service Bus: set AB_WORKER_SERVICEBUS_CONNECTION_STRING (e.g. the one `ab-worker broker` prints) "
            "or AB_WORKER_SERVICEBUS_NAMESPACE"
        )
    return compose.servicebus_client(settings), settings


# -- broker ---------------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the embedded broker in the foreground."""
    from adapters.local.broker import BrokerConfigError, serve

    try:
        code: int = serve(args.host, args.port, args.config)
    except BrokerConfigError as exc:
        raise UsageError(str(exc)) from None
    return code


# -- publish --------------------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish one request from flags, or every line of a JSON-lines file, through the real SDK."""
    from adapters.servicebus import send_requests

    if bool(args.file) == bool(args.user):
        raise UsageError("give either --user (with --experiment) or --file FILE")
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"{path}: file not found")
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
    client, settings = _client()
    with client:
        sent = send_requests(client, args.queue or settings.queue_name, bodies)
    print(f"published {sent} requests to {args.queue or settings.queue_name!r}", file=sys.stderr)
    return EXIT_OK


# -- dlq ------------------------------------------------------------------------------------------


def _entity(args: argparse.Namespace, settings: Any) -> Any:
    from adapters.servicebus.dlq import Entity

    try:
        return Entity.parse(args.entity or settings.queue_name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_time(text: str | None, flag: str) -> datetime | None:
    """ISO 8601 (UTC if no zone) or a relative age such as ``30m``, ``2h``, ``7d``."""
    if text is None:
        return None
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag}: expected an ISO 8601 time or an age like 2h or 7d, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_dlq_peek(args: argparse.Namespace) -> int:
    """List dead letters without changing them."""
    from adapters.servicebus.dlq import ReplayFilter, peek

    client, settings = _client()
    selection = ReplayFilter(args.reason, args.experiment, parse_time(args.since, "--since"), None)
    with client:
        letters = [x for x in peek(client, _entity(args, settings), limit=args.limit) if selection.matches(x)]
    if args.summary:
        for reason, n in Counter(x.reason for x in letters).most_common():
            print(f"{n:>7}  {reason}")
        print(f"{len(letters):>7}  total")
        return EXIT_OK
    if args.json or not sys.stdout.isatty():
        for letter in letters:
            row = letter.to_json()
            row["experiment_id"] = letter.request.get("experiment_id")
            row["user_id"] = letter.request.get("user_id")
            print(json.dumps(row, ensure_ascii=False))
        return EXIT_OK
    print(
        f"{'seq':>6}  {'enqueued (UTC)':<19}  {'dlv':>3}  {'reason':<24}  {'experiment':<20}  {'user':<12}  description"
    )
    for letter in letters:
        when = letter.enqueued_time.strftime("%Y-%m-%d %H:%M:%S") if letter.enqueued_time else "-"
        experiment = str(letter.request.get("experiment_id", "-"))[:20]
        user = str(letter.request.get("user_id", "-"))[:12]
        print(
            f"{letter.sequence_number:>6}  {when:<19}  {letter.delivery_count:>3}  {letter.reason:<24}  "
            f"{experiment:<20}  {user:<12}  {letter.description[:80]}"
        )
    print(f"{len(letters)} dead letters in {_entity(args, settings)}", file=sys.stderr)
    return EXIT_OK


def cmd_dlq_export(args: argparse.Namespace) -> int:
    """Write dead letters (body + properties) to JSON lines, leaving them in place."""
    from adapters.servicebus.dlq import peek

    client, settings = _client()
    with client:
        letters = peek(client, _entity(args, settings), limit=args.limit)
    with Path(args.file).open("w", encoding="utf-8") as out:
        for letter in letters:
            out.write(json.dumps(letter.to_json(), ensure_ascii=False) + "\n")
    print(f"exported {len(letters)} dead letters to {args.file}", file=sys.stderr)
    return EXIT_OK


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Resubmit dead letters to their entity; complete the DLQ copy only after the broker accepted it."""
    from adapters.servicebus.dlq import ReplayFilter, replay

    if args.from_file:
        return _replay_file(args)
    client, settings = _client()
    entity = _entity(args, settings)
    selection = ReplayFilter(
        args.reason, args.experiment, parse_time(args.since, "--since"), parse_time(args.until, "--until")
    )

    def progress(letter: Any, what: str) -> None:
        if args.verbose:
            print(f"{what} seq {letter.sequence_number} ({letter.reason})", file=sys.stderr)

    with client:
        outcome = replay(
            client,
            entity,
            selection,
            limit=args.limit,
            dry_run=args.dry_run,
            max_replays=args.max_replays,
            rate=args.rate,
            on_progress=progress,
        )
    verb = "would replay" if args.dry_run else "replayed"
    reasons = Counter(x.reason for x in outcome.replayed)
    print(
        f"{verb} {len(outcome.replayed)} dead letters from {entity} ({dict(reasons)}); "
        f"{outcome.not_matching} did not match; {len(outcome.skipped_too_many)} skipped after "
        f"{args.max_replays} replays",
        file=sys.stderr,
    )
    if args.dry_run:
        for letter in outcome.replayed:
            print(json.dumps({"sequence_number": letter.sequence_number, "reason": letter.reason, **letter.request}))
    return EXIT_PARTIAL if outcome.skipped_too_many else EXIT_OK


def _replay_file(args: argparse.Namespace) -> int:
    from adapters.servicebus.dlq import DeadLetter, replay_from_file

    path = Path(args.from_file)
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    letters, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            letters.append(DeadLetter.from_json(data))
        except (json.JSONDecodeError, ValueError) as exc:
            problems.append(f"{path}: line {number}: {exc}")
    if problems:
        raise UsageError("nothing was sent; fix these lines first:\n" + "\n".join(problems))
    client, settings = _client()
    with client:
        if args.dry_run:
            sent = len(letters)
        else:
            sent = replay_from_file(client, _entity(args, settings), letters, rate=args.rate)
    print(f"{'would resubmit' if args.dry_run else 'resubmitted'} {sent} messages from {path}", file=sys.stderr)
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Register ``broker``, ``publish`` and ``dlq``."""
    broker = commands.add_parser(
        "broker",
        help="run the embedded Service Bus broker (AMQP on 127.0.0.1)",
        formatter_class=_formatter,
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
    broker.add_argument("--port", type=int, default=5672, help="port (default 5672; 0 picks a free one)")
    broker.add_argument("--config", help="entities file in the official emulator's Config.json shape")
    broker.set_defaults(func=cmd_broker)

    publish = commands.add_parser(
        "publish",
        help="publish assignment requests to the queue",
        formatter_class=_formatter,
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
    publish.add_argument("--count", type=int, default=1, help="send the request this many times (default 1)")
    publish.add_argument("--file", help="JSON-lines file: one request body per line")
    publish.add_argument("--queue", help="queue (default AB_WORKER_QUEUE_NAME)")
    publish.set_defaults(func=cmd_publish)

    dlq = commands.add_parser(
        "dlq",
        help="inspect, export and replay dead-lettered requests",
        formatter_class=_formatter,
        description=(
            "Dead-letter queue operations. --entity is a queue (default: the requests queue)\n"
            "or TOPIC/Subscriptions/SUB."
        ),
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    peek = actions.add_parser(
        "peek",
        help="list dead letters without changing them",
        formatter_class=_formatter,
        epilog=(
            "examples:\n  ab-worker dlq peek\n  ab-worker dlq peek --summary\n"
            "  ab-worker dlq peek --reason UnknownExperiment --json"
        ),
    )
    _entity_flags(peek)
    peek.add_argument("--summary", action="store_true", help="counts by reason only")
    peek.add_argument("--json", action="store_true", help="JSON lines (the default when stdout is not a terminal)")
    peek.add_argument("--reason", help="only this DeadLetterReason")
    peek.add_argument("--experiment", help="only requests for this experiment")
    peek.add_argument("--since", help="only dead letters enqueued since (ISO time or age like 2h)")
    peek.set_defaults(func=cmd_dlq_peek)

    export = actions.add_parser("export", help="write dead letters to a JSON-lines file", formatter_class=_formatter)
    export.add_argument("file", help="output file (JSON lines: body + properties)")
    _entity_flags(export)
    export.set_defaults(func=cmd_dlq_export)

    replay = actions.add_parser(
        "replay",
        help="resubmit dead letters to their entity",
        formatter_class=_formatter,
        description=(
            "Resubmit dead-lettered requests. Each copy is sent first and the dead letter completed only\n"
            "after the broker accepted it, so an interruption never loses a message (it may duplicate one,\n"
            "which is harmless: assignment is deterministic and event ids are too)."
        ),
        epilog=(
            "examples:\n"
            "  ab-worker dlq replay --reason UnknownExperiment --dry-run\n"
            "  ab-worker dlq replay --reason UnknownExperiment --experiment exp_new --rate 50\n"
            "  ab-worker dlq replay --from repaired.jsonl\n\n"
            "Exit status 1 when some messages were skipped for having been replayed --max-replays times."
        ),
    )
    _entity_flags(replay)
    replay.add_argument("--reason", help="only this DeadLetterReason")
    replay.add_argument("--experiment", help="only requests for this experiment")
    replay.add_argument("--since", help="only dead letters enqueued since (ISO time or age like 2h)")
    replay.add_argument("--until", help="only dead letters enqueued until")
    replay.add_argument("--dry-run", action="store_true", help="show what would move; change nothing")
    replay.add_argument("--rate", type=float, help="at most this many messages per second")
    replay.add_argument("--max-replays", type=int, default=5, help="skip messages replayed this often (default 5)")
    replay.add_argument("--from", dest="from_file", help="resubmit an exported (possibly repaired) JSON-lines file")
    replay.add_argument("--verbose", action="store_true", help="print each message as it moves")
    replay.set_defaults(func=cmd_dlq_replay)


def _entity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entity", help="queue, or TOPIC/Subscriptions/SUB (default: the requests queue)")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many messages (default 1000)")
