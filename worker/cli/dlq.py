"""``ab-worker dlq peek|export|replay|purge`` and ``ab-worker queue peek|dead-letter``.

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
import unicodedata
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

from worker.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    ExitStatus,
    Subcommands,
    check_input,
    check_output,
    formatter,
    integer,
    positive_number,
    servicebus_client,
    servicebus_errors,
)
from worker.domain.errors import UsageError
from worker.domain.moments import MomentError, parse_moment
from worker.domain.plural import counted
from worker.service.signals import on_signals

if TYPE_CHECKING:
    from adapters.servicebus.dlq import DeadLetter, Entity, Outcome, ReplayFilter, Selection
    from worker.service.settings import WorkerSettings

# -- dlq and queue ---------------------------------------------------------------------------------

#: Characters a terminal or a viewer could act on: C0/C1 controls (ESC sequences), format characters
#: (bidi overrides, zero-width), line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def printable(value: object) -> str:
    """``value`` as text safe for a terminal cell: every control or format character escaped."""
    text = "-" if value is None else str(value)
    if all(ch.isprintable() and ch != "\\" for ch in text):
        return text
    return "".join(_escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if unicodedata.category(ch) not in _UNSAFE_CATEGORIES:
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def json_line(value: object) -> str:
    """One JSON line that is safe on a terminal and survives line splitting: unsafe characters escaped."""
    text = json.dumps(value, ensure_ascii=False)
    return "".join(_json_escape(ch) for ch in text) if not text.isprintable() else text


def _json_escape(ch: str) -> str:
    if unicodedata.category(ch) not in _UNSAFE_CATEGORIES:
        return ch
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _entity(args: argparse.Namespace, settings: WorkerSettings) -> Entity:
    from adapters.servicebus.dlq import Entity

    try:
        return Entity.parse(args.entity or settings.queue_name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_time(text: str | None, flag: str) -> datetime | None:
    """The one time grammar of every command: ISO 8601 (UTC if no zone) or an age such as ``2h``, ``1w``."""
    if text is None:
        return None
    try:
        return parse_moment(text, datetime.now(UTC))
    except MomentError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _filter(args: argparse.Namespace) -> ReplayFilter:
    from adapters.servicebus.dlq import ReplayFilter

    return ReplayFilter(
        args.reason,
        args.experiment,
        parse_time(args.since, "--since"),
        parse_time(args.until, "--until"),
    )


def _check_reason(reason: str | None, present: Counter[str]) -> None:
    """A ``--reason`` that is neither one we know nor one in this DLQ is a typo: say which exist."""
    from adapters.servicebus.dlq import KNOWN_REASONS

    if reason is None or reason in KNOWN_REASONS or reason in present:
        return
    here = sorted(r for r in present if r and r not in KNOWN_REASONS)
    extra = f"; also in this dead-letter queue: {', '.join(here)}" if here else ""
    raise UsageError(f"unknown --reason {reason!r}; known reasons: {', '.join(KNOWN_REASONS)}{extra}")


def _n(count: int) -> str:
    return f"{count:,}"


def _dead_letters(count: int, kind: str = "") -> str:
    """``1 dead letter``, ``1,500 matching dead letters``: a count of dead letters as every message writes it."""
    return counted(count, f"{kind} dead letter".lstrip(), thousands=True)


def _were(count: int) -> str:
    return "was" if count == 1 else "were"


def _row(letter: DeadLetter, dead_letter: bool) -> str:
    when = letter.enqueued_time.strftime("%Y-%m-%d %H:%M:%S") if letter.enqueued_time else "-"
    experiment = printable(letter.request.get("experiment_id", "-"))[:20]
    user = printable(letter.request.get("user_id", "-"))[:16]
    head = f"{letter.sequence_number:>6}  {when:<19}  {letter.delivery_count:>3}  "
    if dead_letter:
        reason, description = printable(letter.reason)[:24], printable(letter.description)[:80]
        return f"{head}{reason:<24}  {experiment:<20}  {user:<16}  {description}"
    body = printable(letter.body.decode("utf-8", "replace"))[:60]
    return f"{head}{printable(letter.message_id)[:36]:<36}  {experiment:<20}  {user:<16}  {body}"


def _header(dead_letter: bool) -> str:
    middle = f"{'reason':<24}" if dead_letter else f"{'message id':<36}"
    last = "description" if dead_letter else "body"
    return f"{'seq':>6}  {'enqueued (UTC)':<19}  {'dlv':>3}  {middle}  {'experiment':<20}  {'user':<16}  {last}"


def _show(letters: list[DeadLetter], args: argparse.Namespace, dead_letter: bool) -> None:
    if args.json or not sys.stdout.isatty():
        for letter in letters:
            row = letter.to_json()
            row["experiment_id"] = letter.request.get("experiment_id")
            row["user_id"] = letter.request.get("user_id")
            print(json_line(row))
        return
    print(_header(dead_letter))
    for letter in letters:
        print(_row(letter, dead_letter))


def cmd_dlq_peek(args: argparse.Namespace) -> int:
    """List dead letters without changing them: every one, unless --limit says otherwise (and then says so)."""
    from adapters.servicebus.dlq import browse

    selection = _filter(args)
    client, settings = servicebus_client()
    entity = _entity(args, settings)
    shown: list[DeadLetter] = []
    scanned, matching, reasons, present = 0, 0, Counter[str](), Counter[str]()
    with client, servicebus_errors(f"peeking at the dead letters of {entity}"):
        for letter in browse(client, entity):
            scanned += 1
            present[letter.reason] += 1
            if not selection.matches(letter):
                continue
            matching += 1
            reasons[letter.reason] += 1
            if not args.summary and (args.limit is None or len(shown) < args.limit):
                shown.append(letter)
    _check_reason(args.reason, present)
    of_all = "" if selection.is_empty else f" (of {_dead_letters(scanned)})"
    if args.summary:
        for reason, n in reasons.most_common():
            print(f"{n:>7}  {printable(reason)}")
        print(f"{matching:>7}  total in {entity}{of_all}")
        return EXIT_OK
    _show(shown, args, dead_letter=True)
    kind = "" if selection.is_empty else "matching"
    if len(shown) < matching:
        print(
            f"showed {_n(len(shown))} of {_dead_letters(matching, kind)} in {entity} (--limit {args.limit})",
            file=sys.stderr,
        )
    else:
        print(f"{_dead_letters(matching, kind)} in {entity}{of_all}", file=sys.stderr)
    return EXIT_OK


def _open_for_writing(path: Path) -> IO[str]:
    check_output(path)
    try:
        return path.open("w", encoding="utf-8", newline="\n")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None


def cmd_dlq_export(args: argparse.Namespace) -> int:
    """Write dead letters (body + properties) to JSON lines, leaving them in place."""
    from adapters.servicebus.dlq import browse

    path = Path(args.file)
    out = _open_for_writing(path)  # before connecting: a bad path fails fast and changes nothing
    written, scanned = 0, 0
    with out:
        client, settings = servicebus_client()
        entity = _entity(args, settings)
        with client, servicebus_errors(f"exporting the dead letters of {entity} to {path}"):
            for letter in browse(client, entity):
                scanned += 1
                if args.limit is None or written < args.limit:
                    out.write(json_line(letter.to_json()) + "\n")
                    written += 1
    if written < scanned:
        print(f"exported {_n(written)} of {_dead_letters(scanned)} from {entity} to {path} (--limit)", file=sys.stderr)
    else:
        everything = f"all {_dead_letters(written)}" if written != 1 else "the one dead letter"
        print(f"exported {everything} from {entity} to {path}", file=sys.stderr)
    return EXIT_OK


class _CtrlC:
    """Ctrl-C during ``dlq replay`` or ``dlq purge``: stop between two dead letters, then say what was done.

    The first Ctrl-C sets :attr:`stop`, which the adapter checks between dead letters (never between
    sending a copy and completing its dead letter); it releases what it holds and returns its
    outcome. A second one, or one at the confirmation prompt, interrupts at once.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.at_once = False

    def __call__(self, received: signal.Signals) -> None:
        if self.at_once or self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def handling(self) -> AbstractContextManager[list[signal.Signals]]:
        """The block in which Ctrl-C is this object's (the previous handler is restored after it)."""
        return on_signals(self, (signal.SIGINT,))


def _confirm(verb: str, entity: Entity, assume_yes: bool, ctrl_c: _CtrlC | None = None) -> Callable[[Selection], bool]:
    def ask(found: Selection) -> bool:
        if assume_yes:
            return True
        if not sys.stdin.isatty():
            return False
        if ctrl_c is not None:
            ctrl_c.at_once = True  # Ctrl-C at the prompt is an answer now, not after the scan
        try:
            answer = input(f"{verb} {_dead_letters(len(found.targets))} in {entity}? [y/N] ")
        except EOFError:  # the terminal closed its input: that is not a yes
            return False
        finally:
            if ctrl_c is not None:
                ctrl_c.at_once = False
        return answer.strip().lower() in {"y", "yes"}

    return ask


def _report(verb: str, past: str, entity: Entity, outcome: Outcome, dry_run: bool) -> int:
    found = outcome.selection
    reasons = ", ".join(f"{printable(r)}: {n}" for r, n in Counter(x.reason for x in outcome.done).most_common())
    if not outcome.interrupted:
        matching = _dead_letters(len(found.matched), "matching")
        print(
            f"{'would ' + verb if dry_run else past} {_n(len(outcome.done))} of {matching}"
            f" in {entity}{f' ({reasons})' if reasons else ''}; scanned {_n(found.scanned)}, "
            f"{_n(found.not_matching)} did not match; {_n(len(outcome.skipped))} skipped",
            file=sys.stderr,
        )
    return _report_details(past, entity, outcome)


def _report_details(past: str, entity: Entity, outcome: Outcome) -> int:
    """The lines under a summary (skips by reason, what was held, dropped connections); the exit status."""
    from adapters.servicebus.dlq import SKIP_INTERRUPTED, SKIP_LIMIT

    if outcome.interrupted:
        # The targets not done are still in the dead-letter queue: the next run picks them up.
        targets, done = len(outcome.selection.targets), len(outcome.done)
        print(
            f"interrupted: {past} {_n(done)} of {_dead_letters(targets, 'selected')}, {_n(targets - done)} left in"
            f" the dead-letter queue of {entity}",
            file=sys.stderr,
        )
    for why, n in Counter(why for _, why in outcome.skipped if why != SKIP_INTERRUPTED).most_common():
        print(f"  {n:>6} skipped: {why}", file=sys.stderr)
    if outcome.cancelled:
        print("cancelled: nothing was changed", file=sys.stderr)
    if outcome.released:
        print(
            f"  {_dead_letters(outcome.released, 'other')} {_were(outcome.released)} held during the scan and released"
            " (delivery count +1)",
            file=sys.stderr,
        )
    if outcome.reconnects:
        lapsed = (
            f"; the locks of {_dead_letters(outcome.lapsed, 'other')} held on them run out by themselves"
            " (delivery count +1)"
            if outcome.lapsed
            else ""
        )
        print(
            f"  rode out {counted(outcome.reconnects, 'dropped connection', thousands=True)}{lapsed}", file=sys.stderr
        )
    if outcome.by_lock_token:
        print(
            f"  {_dead_letters(outcome.by_lock_token)} received on a connection that dropped"
            f" {_were(outcome.by_lock_token)} settled by lock token over a new one, without waiting for"
            " the lock to run out",
            file=sys.stderr,
        )
    if outcome.already_there:
        print(
            f"  {_n(outcome.already_there)} of them had a copy out already (sent before a dropped connection, "
            "or by an interrupted run): completed without sending another",
            file=sys.stderr,
        )
    if outcome.interrupted:
        return ExitStatus.INTERRUPTED
    failed = [x for x in outcome.skipped if x[1] != SKIP_LIMIT]
    return EXIT_PARTIAL if failed else EXIT_OK


def _needs_filter_or_all(args: argparse.Namespace, verb: str) -> None:
    if _filter(args).is_empty and not args.all and not args.dry_run and not sys.stdin.isatty():
        raise UsageError(
            f"{verb} without a filter acts on every dead letter: pass --all, or --reason/--experiment/--since/--until"
        )


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Resubmit dead letters to their entity; complete the DLQ copy only after the broker accepted it."""
    from adapters.servicebus.dlq import replay

    if args.from_file:
        return _replay_file(args)
    _needs_filter_or_all(args, "replay")
    selection = _filter(args)
    client, settings = servicebus_client()
    entity = _entity(args, settings)
    ask_first = selection.is_empty and not args.all

    def progress(letter: DeadLetter, what: str) -> None:
        if args.verbose:
            print(f"{what}: seq {letter.sequence_number} ({printable(letter.reason)})", file=sys.stderr)

    ctrl_c = _CtrlC()
    with client, servicebus_errors(f"replaying dead letters of {entity}"), ctrl_c.handling():
        outcome = replay(
            client,
            entity,
            selection,
            limit=args.limit,
            dry_run=args.dry_run,
            max_replays=args.max_replays,
            rate=args.rate,
            on_progress=progress,
            confirm=_confirm("replay all", entity, assume_yes=False, ctrl_c=ctrl_c) if ask_first else None,
            stop=ctrl_c.stop,
        )
    _check_reason(args.reason, outcome.selection.reasons)
    if args.dry_run:
        for letter in outcome.done:
            print(json_line({"sequence_number": letter.sequence_number, "reason": letter.reason, **letter.request}))
    return _report("replay", "replayed", entity, outcome, args.dry_run)


def cmd_dlq_purge(args: argparse.Namespace) -> int:
    """Delete matching dead letters for good, after a confirmation (--yes in scripts)."""
    from adapters.servicebus.dlq import purge

    if args.from_file:
        return _purge_file(args)
    if _filter(args).is_empty and not args.all:
        raise UsageError("purge needs a filter (--reason, --experiment, --since, --until), --all or --from FILE")
    _needs_confirmation(args)
    client, settings = servicebus_client()
    entity = _entity(args, settings)
    ctrl_c = _CtrlC()
    with client, servicebus_errors(f"purging dead letters of {entity}"), ctrl_c.handling():
        outcome = purge(
            client,
            entity,
            _filter(args),
            limit=args.limit,
            dry_run=args.dry_run,
            confirm=_confirm("delete", entity, assume_yes=args.yes, ctrl_c=ctrl_c),
            stop=ctrl_c.stop,
        )
    _check_reason(args.reason, outcome.selection.reasons)
    return _report("purge", "purged", entity, outcome, args.dry_run)


def _needs_confirmation(args: argparse.Namespace) -> None:
    if not (args.yes or args.dry_run or sys.stdin.isatty()):
        raise UsageError("purge deletes dead letters for good: pass --yes to confirm (no terminal to ask on)")


def _read_lines(path: Path, nothing: str) -> list[tuple[int, str]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path}: line {line}: not UTF-8 (byte {exc.start}); {nothing}") from None
    # Only "\n" ends a line: JSON strings may hold U+2028, U+2029 or U+0085, which splitlines() breaks on.
    return [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1)]


def _read_export(
    path: Path, nothing: str, *, named: bool = False, check: Callable[[DeadLetter], object] | None = None
) -> list[DeadLetter]:
    """Every line of a ``dlq export`` file (possibly repaired), or one error listing the first problems.

    ``named``: every line must name its dead letter (a sequence number), as ``purge --from`` needs.
    ``check``: raises ``ValueError`` for a line that is well formed but cannot be acted on.
    """
    from adapters.servicebus.dlq import DeadLetter

    letters, problems = [], []
    for number, line in _read_lines(path, nothing):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            letter = DeadLetter.from_json(data)
            if named and letter.sequence_number <= 0:
                raise ValueError("no field 'sequence_number': it names no dead letter")
            if check is not None:
                check(letter)
            letters.append(letter)
        except (json.JSONDecodeError, ValueError) as exc:
            problems.append(f"line {number}: {exc}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"{path}: {nothing}; fix {'; '.join(problems[:3])}{more}")
    return letters


def _purge_file(args: argparse.Namespace) -> int:
    """``purge --from FILE``: exactly the dead letters an export names, each only if its body is the one exported."""
    from adapters.servicebus.dlq import purge_exported

    if not _filter(args).is_empty or args.all or args.limit is not None:
        raise UsageError(
            "--from purges exactly the dead letters the file names: it takes no --reason, --experiment, --since,"
            " --until, --all or --limit"
        )
    _needs_confirmation(args)
    path = check_input(Path(args.from_file))
    letters = _read_export(path, "nothing was purged", named=True)
    client, settings = servicebus_client()
    entity = _entity(args, settings)
    ctrl_c = _CtrlC()
    with client, servicebus_errors(f"purging the dead letters {path} names from {entity}"), ctrl_c.handling():
        outcome = purge_exported(
            client,
            entity,
            letters,
            dry_run=args.dry_run,
            confirm=_confirm("delete", entity, assume_yes=args.yes, ctrl_c=ctrl_c),
            stop=ctrl_c.stop,
        )
    if not outcome.interrupted:
        absent = len(outcome.selection.not_found)
        print(
            f"{'would purge' if args.dry_run else 'purged'} {_n(len(outcome.done))} of the"
            f" {_dead_letters(len(letters))} {path} names, from {entity}; {_n(absent)} not in its dead-letter queue"
            f" (removed already, or exported from another entity); {_n(len(outcome.skipped))} skipped",
            file=sys.stderr,
        )
    return _report_details("purged", entity, outcome)


def _replay_file(args: argparse.Namespace) -> int:
    from adapters.servicebus.dlq import check_copy, replay_from_file

    path = check_input(Path(args.from_file))
    # Every copy is checked before any is sent: a line the SDK will not send (a session id over 128
    # characters, say) is named with its line number, and nothing of the file goes out.
    letters = _read_export(path, "nothing was sent", check=check_copy)
    client, settings = servicebus_client()
    entity = _entity(args, settings)
    if args.dry_run:
        print(f"would resubmit {counted(len(letters), 'message', thousands=True)} from {path}", file=sys.stderr)
        return EXIT_OK
    ctrl_c = _CtrlC()
    with client, servicebus_errors(f"resubmitting {path} to {entity}"), ctrl_c.handling():
        result = replay_from_file(client, entity, letters, rate=args.rate, stop=ctrl_c.stop)
    waiting = (
        f"; {_n(result.already_out)} {_were(result.already_out)} on the queue already (not sent again)"
        if result.already_out
        else ""
    )
    if result.left:
        print(
            f"interrupted: resubmitted {_n(result.sent)} of {counted(len(letters), 'message', thousands=True)} from"
            f" {path}{waiting}; {_n(result.left)} not sent: run it again to send them (none is sent twice)",
            file=sys.stderr,
        )
        return ExitStatus.INTERRUPTED
    print(
        f"resubmitted {counted(result.sent, 'message', thousands=True)} from {path} to {entity}{waiting}",
        file=sys.stderr,
    )
    _say_originals_stay(args, path, entity, letters)
    return EXIT_OK


def _say_originals_stay(args: argparse.Namespace, path: Path, entity: Entity, letters: list[DeadLetter]) -> None:
    """``replay --from`` sends copies and removes nothing: say so, and how to remove exactly the originals."""
    originals = sum(1 for letter in letters if letter.sequence_number)
    if not originals:
        return  # a hand-written file names no dead letter
    where = f" --entity {shlex.quote(args.entity)}" if args.entity else ""
    print(
        f"replay --from removes nothing from the dead-letter queue of {entity}: to remove the"
        f" {_dead_letters(originals)} {path} was exported from, and only those:"
        f" ab-worker dlq purge --from {shlex.quote(str(path))}{where}",
        file=sys.stderr,
    )


def cmd_queue_peek(args: argparse.Namespace) -> int:
    """List active messages without changing them (to find a poison message)."""
    from adapters.servicebus.dlq import ReplayFilter, browse

    selection = ReplayFilter(experiment=args.experiment)
    client, settings = servicebus_client()
    entity = _entity(args, settings)
    shown: list[DeadLetter] = []
    more = False
    with client, servicebus_errors(f"peeking at the active messages of {entity}"):
        for letter in browse(client, entity, dead_letter=False):
            if not selection.matches(letter):
                continue
            if len(shown) >= args.limit:
                more = True
                break
            shown.append(letter)
    _show(shown, args, dead_letter=False)
    if more:
        print(
            f"showed the first {counted(len(shown), 'message', thousands=True)} in {entity}; more are waiting"
            " (raise --limit)",
            file=sys.stderr,
        )
    else:
        print(f"{counted(len(shown), 'message', thousands=True)} in {entity}", file=sys.stderr)
    return EXIT_OK


def cmd_queue_dead_letter(args: argparse.Namespace) -> int:
    """Move one chosen active message to the dead-letter queue."""
    from adapters.servicebus.dlq import dead_letter_active

    if (args.message_id is None) == (args.sequence_number is None):
        raise UsageError("give exactly one of --message-id ID or --sequence-number N")
    which = (
        f"message id {args.message_id!r}" if args.message_id is not None else f"sequence number {args.sequence_number}"
    )
    client, settings = servicebus_client()
    entity = _entity(args, settings)
    with client, servicebus_errors(f"moving the message with {which} in {entity} to its dead-letter queue"):
        outcome = dead_letter_active(
            client,
            entity,
            message_id=args.message_id,
            sequence_number=args.sequence_number,
            reason=args.reason,
            description=args.description or "",
        )
    if not outcome.selection.matched:
        looked = counted(outcome.selection.scanned, "message", thousands=True)
        raise UsageError(f"no active message with {which} in {entity} ({looked} looked at)")
    for letter in outcome.done:
        print(
            f"dead-lettered seq {letter.sequence_number} ({which}) in {entity} as {printable(args.reason)}",
            file=sys.stderr,
        )
    for letter, why in outcome.skipped:
        print(f"not moved: seq {letter.sequence_number}: {why}", file=sys.stderr)
    if outcome.released:
        print(
            f"{counted(outcome.released, 'other message', thousands=True)} {_were(outcome.released)} held while looking"
            " for it and released (delivery count +1)",
            file=sys.stderr,
        )
    return EXIT_PARTIAL if outcome.skipped else EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Register ``dlq`` and ``queue``."""
    _add_dlq(commands)
    _add_queue(commands)


_FILTER_HELP = "filters: --reason, --experiment, --since, --until (ages like 30m, 2h, 7d, 1w, or ISO 8601 times)"


def _filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="only this DeadLetterReason (an unknown one is an error listing the known)")
    parser.add_argument("--experiment", help="only requests for this experiment")
    parser.add_argument("--since", help="only dead letters enqueued since (ISO time or age like 2h)")
    parser.add_argument("--until", help="only dead letters enqueued until (ISO time or age)")


def _add_dlq(commands: Subcommands) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect, export, replay and purge dead-lettered requests",
        formatter_class=formatter,
        description=(
            "Dead-letter queue operations. --entity is a queue (default: the requests queue)\n"
            "or TOPIC/Subscriptions/SUB. Every command looks at every dead letter; --limit caps\n"
            "what is shown or acted on, and the command then says how many it left out."
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
    _filter_flags(peek)
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
            "Resubmit dead-lettered requests. Each copy is sent first and its dead letter completed only\n"
            "after the broker accepted it: an interruption never loses a message. A copy carries the\n"
            "original's message id and enqueued time (ab_replay_original_message_id,\n"
            "ab_replay_original_enqueued_time), so its events have the original's ids and byte-identical\n"
            "bodies: a repeated event is a true duplicate, which the topic's duplicate detection and\n"
            "Kusto's dedup view drop. A dropped connection is replaced and the run goes on. A dead letter\n"
            "always gets the same copy id, and a copy already out (waiting on the queue, back in the\n"
            "dead-letter queue, or sent earlier in the run) is not sent again, so a re-run after an\n"
            "interruption adds no copies; a copy whose send was cut off is sent again under the same id,\n"
            "for the queue's duplicate detection to drop. The one way a request is processed twice: a run\n"
            "cut between sending a copy and completing its dead letter, re-run after the duplicate-\n"
            "detection window, once a worker has completed that copy (identical events and rows again).\n"
            "Without a filter, pass --all (a terminal asks instead)."
        ),
        epilog=(
            "examples:\n"
            "  ab-worker dlq replay --reason UnknownExperiment --dry-run\n"
            "  ab-worker dlq replay --reason UnknownExperiment --experiment exp_new --rate 50\n"
            "  ab-worker dlq replay --all\n"
            "  ab-worker dlq replay --from repaired.jsonl\n\n"
            f"{_FILTER_HELP}.\n"
            "Exit status 1 when some matching dead letters were skipped (each reason is printed), among\n"
            "them when the connection kept dropping without anything getting done: run it again.\n"
            "Ctrl-C stops between two dead letters (never between a copy and its completion), releases\n"
            "what the run held and says how many were replayed and how many are left; exit status 130.\n"
            "replay --from sends copies and removes nothing: it prints the dlq purge --from command that\n"
            "removes exactly the dead letters the file was exported from."
        ),
    )
    _entity_flags(replay)
    _filter_flags(replay)
    replay.add_argument("--all", action="store_true", help="replay every dead letter (needed when no filter is given)")
    replay.add_argument("--dry-run", action="store_true", help="show what would move; change nothing")
    replay.add_argument("--rate", type=positive_number, help="at most this many messages per second")
    replay.add_argument(
        "--max-replays", type=integer(1), default=5, help="skip messages replayed this often (default 5)"
    )
    replay.add_argument("--from", dest="from_file", help="resubmit an exported (possibly repaired) JSON-lines file")
    replay.add_argument("--verbose", action="store_true", help="print each message as it moves")
    replay.set_defaults(func=cmd_dlq_replay)

    purge = actions.add_parser(
        "purge",
        help="delete dead letters for good (asks first; --yes in scripts)",
        formatter_class=formatter,
        description=(
            "Delete matching dead letters. Needs a filter, --all or --from, and a confirmation: a terminal\n"
            "asks; without one, --yes is required and the command refuses otherwise. Export first if in doubt.\n"
            "--from FILE deletes exactly the dead letters an export names (after replay --from sent their\n"
            "repaired copies): each by sequence number and message id, and only while its body is still the\n"
            "one exported (the line's body_sha256; a line without one must carry the body unchanged); any\n"
            "other is skipped and named, never deleted."
        ),
        epilog=(
            "examples:\n"
            "  ab-worker dlq purge --reason InvalidJson --until 7d --dry-run\n"
            "  ab-worker dlq purge --reason InvalidJson --until 7d --yes\n"
            "  ab-worker dlq purge --from repaired.jsonl --dry-run\n\n"
            f"{_FILTER_HELP}.\n"
            "Exit status 1 when some dead letters were skipped (each reason is printed); 130 after Ctrl-C,\n"
            "which stops between two dead letters and says how many were purged."
        ),
    )
    _entity_flags(purge)
    _filter_flags(purge)
    purge.add_argument("--all", action="store_true", help="delete every dead letter (needed when no filter is given)")
    purge.add_argument("--dry-run", action="store_true", help="count what would be deleted; change nothing")
    purge.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    purge.add_argument(
        "--from", dest="from_file", help="delete exactly the dead letters this dlq export file names (no filter)"
    )
    purge.set_defaults(func=cmd_dlq_purge)


def _add_queue(commands: Subcommands) -> None:
    queue = commands.add_parser(
        "queue",
        help="inspect active requests; move a poison message to the dead-letter queue",
        formatter_class=formatter,
        description=(
            "Active-queue operations. --entity is a queue (default: the requests queue) or TOPIC/Subscriptions/SUB."
        ),
    )
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    peek = actions.add_parser(
        "peek",
        help="list active messages without changing them",
        formatter_class=formatter,
        epilog="examples:\n  ab-worker queue peek\n  ab-worker queue peek --experiment exp_001 --limit 500 --json",
    )
    peek.add_argument("--entity", help="queue, or TOPIC/Subscriptions/SUB (default: the requests queue)")
    peek.add_argument("--limit", type=integer(1), default=100, help="show at most this many (default 100)")
    peek.add_argument("--experiment", help="only requests for this experiment")
    peek.add_argument("--json", action="store_true", help="JSON lines (the default when stdout is not a terminal)")
    peek.set_defaults(func=cmd_queue_peek)

    dead_letter = actions.add_parser(
        "dead-letter",
        help="move a chosen active message to the dead-letter queue",
        formatter_class=formatter,
        description=(
            "Move one active message (found by message id or sequence number, e.g. from `queue peek`)\n"
            "to the dead-letter queue. Messages ahead of it are held while it is found and then released,\n"
            "which raises their delivery count by one; a message a running worker holds cannot be moved."
        ),
        epilog="example:\n  ab-worker queue dead-letter --message-id 3f2a... --description 'crashes the worker'",
    )
    dead_letter.add_argument("--entity", help="queue, or TOPIC/Subscriptions/SUB (default: the requests queue)")
    dead_letter.add_argument("--message-id", help="the message's id")
    dead_letter.add_argument("--sequence-number", type=integer(1), help="the message's sequence number")
    dead_letter.add_argument(
        "--reason", default="DeadLetteredByOperator", help="DeadLetterReason to set (default DeadLetteredByOperator)"
    )
    dead_letter.add_argument("--description", help="DeadLetterErrorDescription to set")
    dead_letter.set_defaults(func=cmd_queue_dead_letter)


def _entity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entity", help="queue, or TOPIC/Subscriptions/SUB (default: the requests queue)")
    parser.add_argument(
        "--limit", type=integer(1), help="show or act on at most this many (default: all; a cap is always reported)"
    )
