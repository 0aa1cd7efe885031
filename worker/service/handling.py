"""Turning one request message into its assignment event: decode → validate → look up → assign.

Pure functions of the message, the registry and the settings: no I/O, so a redelivered message
always yields the same event (same ``event_id``, same content), and so does a replayed copy: it
carries the original's message id and enqueued time (:func:`request_identity`, :func:`decision_time`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue, ValidationError
from pydantic_core import ErrorDetails

from schemas.models import (
    MAX_BODY_BYTES,
    MAX_COHORT_MEMBERS,
    SCHEMA_VERSION,
    AssignmentEvent,
    AssignmentRequest,
    CohortAssignmentRequest,
    CohortReportEvent,
    NotJsonNumber,
    finite_json_float,
    refuse_json_constant,
    request_context_located_problem,
)
from worker.domain.errors import DeadLetterReason, DecodeError, PermanentError
from worker.domain.plural import counted
from worker.domain.registry import ExperimentRegistry
from worker.service.ports import Delivery, OutboundEvent

if TYPE_CHECKING:
    from worker.domain.allocation import AllocatedExperiment
    from worker.domain.cohort.allocation import Partition

#: The ``reason`` of a cohort member's event: stratified randomisation decided it (``docs/wire-contract.md``).
COHORT_REASON = "stratified"

#: Namespace for event ids: uuid5(EVENT_NAMESPACE, message_id). Fixed forever: changing it would
#: give redelivered requests new ids and defeat duplicate detection downstream.
EVENT_NAMESPACE = uuid.UUID("6f1c9a52-3a8e-5d7b-9f3e-0c4b2a1d8e77")

#: Default limit on a request body (the contract's, stated beside its schemas). Service Bus Standard
#: allows 256 KiB; requests are far smaller.
DEFAULT_MAX_BODY_BYTES = MAX_BODY_BYTES

#: Largest event body the worker publishes: Service Bus Standard takes 256 KiB per message, headers
#: and application properties included, so a body gets 192 KiB and the rest is left for those.
DEFAULT_MAX_EVENT_BYTES = 192 * 1024


#: Application property ``dlq replay`` sets on a resubmitted copy: the message id of the request
#: as first published. The copy needs a new message id (the queue's duplicate detection would drop
#: it otherwise), but its events keep the original's ids, so a replay never duplicates an event
#: that was already accepted.
REPLAY_ORIGINAL_MESSAGE_ID = "ab_replay_original_message_id"

#: Application property ``dlq replay`` sets on a resubmitted copy: the enqueued time of the request as
#: first published (ISO 8601 with its UTC offset), kept across replays of replays. A copy is decided
#: at that time, so its events are byte-identical to the original's: ``assigned_at``, and whether the
#: request falls in an experiment's ``start_at``/``end_at`` window, must not depend on when an
#: operator replayed it.
REPLAY_ORIGINAL_ENQUEUED_TIME = "ab_replay_original_enqueued_time"

#: Longest value of :data:`REPLAY_ORIGINAL_ENQUEUED_TIME` worth parsing (``2026-11-24T08:15:02.123000+00:00``
#: is 32 characters); anything longer is refused unread.
_MAX_TIME_TEXT = 64


def decision_time(delivery: Delivery) -> datetime:
    """The time this request is decided at: a replayed copy's original enqueued time, else its own.

    The property is publisher-controllable (any sender may set it), so it is believed only when it is
    a well-formed, zone-qualified ISO 8601 time no later than this delivery's own enqueued time (a
    copy is always enqueued after its original): otherwise the request is dead-lettered as
    ``SchemaValidationFailed`` naming the property, rather than decided at a time it chose or quietly
    at another one. A source without enqueued times (files, fakes) decides at the current time.
    """
    enqueued = delivery.enqueued_time
    if REPLAY_ORIGINAL_ENQUEUED_TIME in delivery.application_properties:
        return original_enqueued_time(delivery.application_properties[REPLAY_ORIGINAL_ENQUEUED_TIME], enqueued)
    return enqueued or datetime.now(UTC)


def original_enqueued_time(value: object, enqueued: datetime | None = None) -> datetime:
    """Read :data:`REPLAY_ORIGINAL_ENQUEUED_TIME` (in UTC); :class:`PermanentError` when it cannot be believed.

    ``enqueued`` is the carrying message's own enqueued time, the latest the original can have been.
    """

    def refused(problem: str) -> PermanentError:
        return PermanentError(
            DeadLetterReason.SCHEMA_VALIDATION_FAILED,
            f"application property {REPLAY_ORIGINAL_ENQUEUED_TIME}: {problem} (got {_short_repr(value)})",
        )

    if not isinstance(value, str):
        raise refused(f"must be an ISO 8601 time as text, not {type(value).__name__}")
    if len(value) > _MAX_TIME_TEXT:
        raise refused(f"is {len(value)} characters; an ISO 8601 time has at most {_MAX_TIME_TEXT}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise refused("is not an ISO 8601 time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise refused("has no UTC offset (write it as ...+00:00 or ...Z)")
    try:
        when = when.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+00:01 is a time, but in year 0 once in UTC
        raise refused("is outside the years 0001 to 9999 in UTC") from None
    if enqueued is not None and when > (enqueued if enqueued.tzinfo else enqueued.replace(tzinfo=UTC)):
        raise refused(f"is later than this message's own enqueued time {enqueued.isoformat()}")
    return when


def request_identity(delivery: Delivery) -> str:
    """The id events and correlation derive from: the original message id of a replayed copy."""
    original = delivery.application_properties.get(REPLAY_ORIGINAL_MESSAGE_ID)
    return original if isinstance(original, str) and original else delivery.message_id


def event_id_for(message_id: str, member: str | None = None) -> str:
    """Deterministic event id from the request's message id (and the member, for cohorts)."""
    name = message_id if member is None else f"{message_id}\x1f{member}"
    return str(uuid.uuid5(EVENT_NAMESPACE, name))


def decode_request(
    delivery: Delivery, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> AssignmentRequest | CohortAssignmentRequest:
    """Parse and validate a request body, or raise :class:`PermanentError` saying exactly why.

    A body with ``"kind": "cohort"`` is a :class:`CohortAssignmentRequest`; anything else is read as an
    :class:`AssignmentRequest`.
    """
    if delivery.unreadable is not None:
        raise delivery.unreadable
    body = delivery.body
    if len(body) > max_body_bytes:
        raise PermanentError(
            DeadLetterReason.MESSAGE_TOO_LARGE, f"body is {len(body)} bytes; the limit is {max_body_bytes}"
        )
    data = parse_json_object(body)
    model: type[AssignmentRequest] | type[CohortAssignmentRequest] = (
        CohortAssignmentRequest if data.get("kind") == "cohort" else AssignmentRequest
    )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PermanentError(DeadLetterReason.SCHEMA_VALIDATION_FAILED, describe_validation_error(exc)) from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode UTF-8 JSON whose top level is an object; raise :class:`DecodeError` otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(body, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text, parse_constant=refuse_json_constant, parse_float=finite_json_float)
    except NotJsonNumber as exc:
        raise DecodeError(body, f"body is not JSON: {exc} (RFC 8259 has no NaN or infinity)") from None
    except json.JSONDecodeError as exc:
        raise DecodeError(body, f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DecodeError(body, "body is not JSON the worker accepts: nested too deeply") from None
    except ValueError as exc:  # an integer over Python's int/str conversion limit (4300 digits), 1e400
        raise DecodeError(body, f"body is not JSON the worker accepts: {exc}") from None
    if not isinstance(data, dict):
        raise PermanentError(
            DeadLetterReason.SCHEMA_VALIDATION_FAILED,
            f"body must be a JSON object, got {type(data).__name__}",
        )
    return data


def describe_validation_error(exc: ValidationError) -> str:
    """``field: problem (got value)`` for each error, values shortened so descriptions stay bounded.

    Never a context value (it may hold personal data, and descriptions reach the DLQ, ``dlq peek``
    and replayed copies): a context problem names its key path instead (:func:`_context_error`).
    """
    parts = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(p) for p in error["loc"]) or "(body)"
        if error["loc"][:1] == ("context",):
            parts.append(_context_error(error, field))
            continue
        got = ""
        if error["type"] != "missing":
            got = f" (got {_short_repr(error.get('input'))})"
        parts.append(f"{field}: {error['msg']}{got}")
    return "; ".join(parts)


def _context_error(error: ErrorDetails, field: str) -> str:
    found = request_context_located_problem(error.get("input")) if error["loc"] == ("context",) else None
    if found is None:  # refused for a reason the contract's limits do not name: the message alone
        return f"{field}: {error['msg']}"
    return f"context{found.path}: {found.problem}"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def allowed_context(context: Mapping[str, JsonValue] | None, allow_list: Collection[str]) -> dict[str, JsonValue]:
    """Only the allow-listed keys: request context may hold personal data and must not leak."""
    if not context or not allow_list:
        return {}
    return {key: value for key, value in context.items() if key in allow_list}


def assign(
    request: AssignmentRequest,
    delivery: Delivery,
    registry: ExperimentRegistry,
    context_allow_list: Collection[str] = (),
) -> AssignmentEvent:
    """The event for a valid request; :class:`PermanentError` when its experiment is unknown.

    Decided by the experiment's allocation (``docs/allocation.md``) with the request's effective
    segment, its whole context (targeting reads it here; only allow-listed keys reach the event) and
    the decision time. An experiment without allocation fields is the seed rule alone, bit for bit.
    """
    experiment = registry.get(request.experiment_id)
    if experiment is None:
        raise PermanentError(
            DeadLetterReason.UNKNOWN_EXPERIMENT,
            f"experiment_id {_short_repr(request.experiment_id)} is not configured "
            f"({counted(len(registry), 'experiment')} in {registry.source})",
        )
    segment = request.effective_segment()
    assigned_at = decision_time(delivery)
    at = assigned_at if assigned_at.tzinfo is not None else assigned_at.replace(tzinfo=UTC)
    allocation = experiment.allocation
    decision = allocation.decide(request.user_id, segment, request.context, at)
    config = experiment.config
    return AssignmentEvent(
        schema_version=SCHEMA_VERSION,
        event_id=event_id_for(request_identity(delivery)),
        request_id=request.request_id,
        correlation_id=delivery.correlation_id or request_identity(delivery),
        variant_id=decision.variant_id,
        hash_value=decision.hash_value,
        threshold=decision.threshold,
        in_experiment=decision.in_experiment,
        reason=decision.reason.value,
        experiment_id=config.id,
        experiment_version=config.version,
        config_version=allocation.config_version,
        user_id=request.user_id,
        segment=segment,
        strategy="md5_hash",
        deterministic=True,
        seed=config.seed,
        split_ratio=dict(experiment.split_for(segment)),
        variant_metadata=experiment.metadata_for(decision.variant_id),
        context=allowed_context(request.context, context_allow_list),
        assigned_at=assigned_at,
    )


def outbound(event: AssignmentEvent, delivery: Delivery) -> OutboundEvent:
    """The event as a broker message: deterministic id, filterable application properties."""
    return OutboundEvent(
        body=event.model_dump_json().encode(),
        message_id=event.event_id,
        correlation_id=event.correlation_id,
        application_properties={
            "event_type": "assignment",
            "experiment_id": event.experiment_id,
            "variant_id": event.variant_id,
            "schema_version": event.schema_version,
        },
        reply_to=delivery.reply_to,
        reply_to_session_id=delivery.reply_to_session_id,
    )


@dataclass(frozen=True, slots=True)
class Handled:
    """What one request message produced: its assignment events, and any other messages to publish."""

    events: list[AssignmentEvent]
    extras: list[OutboundEvent] = field(default_factory=list)

    def outbound(self, delivery: Delivery) -> list[OutboundEvent]:
        """Every broker message for this request, events first."""
        return [outbound(e, delivery) for e in self.events] + self.extras


def handle(
    delivery: Delivery,
    registry: ExperimentRegistry,
    *,
    context_allow_list: Collection[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_cohort_members: int = MAX_COHORT_MEMBERS,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Handled:
    """Decode, validate and assign one message; :class:`PermanentError` when it can never succeed."""
    request = decode_request(delivery, max_body_bytes)
    if isinstance(request, CohortAssignmentRequest):
        return assign_cohort(request, delivery, max_cohort_members, max_event_bytes, registry)
    return Handled([assign(request, delivery, registry, context_allow_list)])


def assign_cohort(
    request: CohortAssignmentRequest,
    delivery: Delivery,
    max_members: int,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    registry: ExperimentRegistry | None = None,
) -> Handled:
    """One event per member plus a cohort report; identical for a replayed message.

    When the cohort's experiment is in ``registry`` with allocation steps, its members go through
    the experiment's overrides, lifecycle, targeting, holdouts and layer first, as ``ab-worker
    stratify --config`` does (:mod:`worker.domain.cohort.allocation`): a member one of them decides
    gets that decision (``in_experiment`` false, the step's reason and variant, no arm), the others
    are stratified. Members carry no context, so targeting sees their segment only.

    The report holds a segment × arm table, so many segments times many arms can outgrow a broker
    message: that is checked here, before anything is published, and refused as ``EventTooLarge``.
    """
    from worker.domain.cohort.arms import Arm
    from worker.domain.cohort.errors import CohortInputError
    from worker.domain.cohort.stratify import stratify_columns

    if len(request.members) > max_members:
        raise PermanentError(
            DeadLetterReason.COHORT_TOO_LARGE,
            f"cohort has {counted(len(request.members), 'member')}; the limit is {max_members} per message "
            "(split it, or use `ab-worker stratify` for files)",
        )
    _check_report_fits(request, max_event_bytes)
    assigned_at = decision_time(delivery)
    arms = [Arm(a.id, a.weight, a.variants_by_segment) for a in request.arms]
    member_ids = [m.member_id for m in request.members]
    segments = [m.segment for m in request.members]
    experiment = None if registry is None else registry.get(request.experiment_id)
    allocated = None if experiment is None or experiment.plain else experiment.allocation
    if allocated is not None:
        # Checked on the whole cohort before allocation takes its decided members out: a repeated id
        # among them would otherwise publish two events under one event id, and positions would name
        # the stratified remainder rather than the request.
        _check_members(member_ids, segments)
    decided = _decided_first(allocated, member_ids, segments, assigned_at) if allocated else None
    if decided is not None:
        member_ids, segments = decided.pick(member_ids), decided.pick(segments)
    try:
        result = stratify_columns(
            member_ids,
            segments,
            arms,
            experiment_id=request.experiment_id,
            seed=request.seed,
            tolerance=request.tolerance,
            min_per_cell=request.min_per_cell,
            assigned_at=assigned_at,
        )
    except CohortInputError as exc:
        raise PermanentError(DeadLetterReason.INVALID_COHORT, "; ".join(exc.problems)) from None
    identity = request_identity(delivery)
    cohort_id = request.request_id or identity
    correlation_id = delivery.correlation_id or identity
    shares = {arm: float(share) for arm, share in result.report.target_shares.items()}
    common: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "request_id": request.request_id,
        "correlation_id": correlation_id,
        "hash_value": None,
        "threshold": None,
        "experiment_id": request.experiment_id,
        "experiment_version": "cohort",
        # The digest of the allocation applied before stratifying; none when none was.
        "config_version": "" if allocated is None else allocated.config_version,
        "strategy": "stratified_random",
        "deterministic": True,
        "seed": str(request.seed),
        "cohort_id": cohort_id,
        "split_ratio": shares,
        "assigned_at": assigned_at,
    }
    events = [
        AssignmentEvent(
            **common,
            event_id=event_id_for(identity, record.customer_id),
            variant_id=record.variant_id,
            in_experiment=True,
            reason=COHORT_REASON,
            user_id=record.customer_id,
            segment=record.segment,
            experiment_arm=record.experiment_arm,
        )
        for record in result.records
    ]
    members = decided.decided if decided is not None else None
    if members is not None:
        events += [
            AssignmentEvent(
                **common,
                event_id=event_id_for(identity, member_id),
                variant_id=decision.variant_id,
                in_experiment=False,
                reason=decision.reason.value,
                user_id=member_id,
                segment=segment,
            )
            for member_id, segment, decision in zip(
                members.member_ids, members.segments, members.decisions, strict=True
            )
        ]
    report_body: dict[str, Any] = result.report.to_dict()
    if allocated is not None and members is not None:
        report_body["allocation"] = {
            "config_version": allocated.config_version,
            "stratified": len(result.records),
            "decided": len(members),
            "counts": members.counts(),
        }
    report = CohortReportEvent(
        event_id=event_id_for(identity, "\x1ecohort-report"),
        cohort_id=cohort_id,
        correlation_id=correlation_id,
        experiment_id=request.experiment_id,
        seed=str(request.seed),
        member_count=len(events),
        passed=result.report.passed,
        report=report_body,
        assigned_at=assigned_at,
    )
    body = report.model_dump_json().encode()
    if len(body) > max_event_bytes:
        raise _report_too_large(request, len(body), max_event_bytes)
    extra = OutboundEvent(
        body=body,
        message_id=report.event_id,
        correlation_id=correlation_id,
        application_properties={
            "event_type": "cohort_report",
            "experiment_id": request.experiment_id,
            "schema_version": report.schema_version,
            "passed": str(report.passed).lower(),
        },
        reply_to=delivery.reply_to,
        reply_to_session_id=delivery.reply_to_session_id,
    )
    return Handled(events, [extra])


def _check_members(member_ids: list[str], segments: list[str]) -> None:
    """:class:`PermanentError` (``InvalidCohort``) naming every member problem, by its position in the request."""
    from worker.domain.cohort.members import member_problems

    problems = member_problems(member_ids, segments)
    if problems:
        raise PermanentError(
            DeadLetterReason.INVALID_COHORT,
            "; ".join(f"members[{position}]: {problem}" for position, problem in problems),
        )


def _decided_first(
    allocated: AllocatedExperiment, member_ids: list[str], segments: list[str], at: datetime
) -> Partition:
    """The members the experiment's allocation decides before stratification; refused when it decides all."""
    from worker.domain.cohort.allocation import partition

    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    split = partition(allocated, member_ids, segments, None, aware)
    if not split.stratified:
        reasons = split.decided.counts_text()
        raise PermanentError(
            DeadLetterReason.INVALID_COHORT,
            f"nothing to stratify: the allocation of {allocated.experiment_id} decides every member before "
            f"stratification ({reasons}); check its status, start_at/end_at and targeting (members carry no context)",
        )
    return split


def _check_report_fits(request: CohortAssignmentRequest, max_event_bytes: int) -> None:
    """Refuse, before stratifying, a cohort whose report cannot fit: its counts table alone is too big.

    The table holds ``"arm":n,`` for every segment × arm, at least ``len(arm id) + 5`` bytes each; the
    exact size is checked again once the report is built.
    """
    segments = len({m.segment for m in request.members})
    at_least = segments * sum(len(arm.id.encode()) + 5 for arm in request.arms)
    if at_least > max_event_bytes:
        raise _report_too_large(request, at_least, max_event_bytes, bound=True)


def _report_too_large(
    request: CohortAssignmentRequest, size: int, max_event_bytes: int, bound: bool = False
) -> PermanentError:
    segments = len({m.segment for m in request.members})
    return PermanentError(
        DeadLetterReason.EVENT_TOO_LARGE,
        f"the cohort report event would be {'at least ' if bound else ''}{size} bytes"
        f" ({counted(segments, 'segment')} × {counted(len(request.arms), 'arm')}); the limit is {max_event_bytes}"
        " bytes per message: split the cohort, or use fewer segments or arms",
    )
