"""``ab-worker dlq peek|export|replay``: inspect, export and replay dead-lettered requests.

Handlers import adapters lazily, so ``ab-worker --help`` stays fast and ``worker/`` keeps no
import-time dependency on Azure SDKs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker.cli.common import EXIT_OK, EXIT_PARTIAL, formatter, servicebus_client
from worker.domain.errors import UsageError


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

    client, settings = servicebus_client()
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

    client, settings = servicebus_client()
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
    client, settings = servicebus_client()
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
    client, settings = servicebus_client()
    with client:
        if args.dry_run:
            sent = len(letters)
        else:
            sent = replay_from_file(client, _entity(args, settings), letters, rate=args.rate)
    print(f"{'would resubmit' if args.dry_run else 'resubmitted'} {sent} messages from {path}", file=sys.stderr)
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Register ``dlq``."""
    dlq = commands.add_parser(
        "dlq",
        help="inspect, export and replay dead-lettered requests",
        formatter_class=formatter,
        description=(
            "Dead-letter queue operations. --entity is a queue (default: the requests queue)\n"
            "or TOPIC/Subscriptions/SUB."
        ),
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    peek = actions.add_parser(
        "peek",
        help="list dead letters without changing them",
        formatter_class=formatter,
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

    export = actions.add_parser("export", help="write dead letters to a JSON-lines file", formatter_class=formatter)
    export.add_argument("file", help="output file (JSON lines: body + properties)")
    _entity_flags(export)
    export.set_defaults(func=cmd_dlq_export)

    replay = actions.add_parser(
        "replay",
        help="resubmit dead letters to their entity",
        formatter_class=formatter,
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
