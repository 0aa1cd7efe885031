"""Turning one request message into its assignment event: decode → validate → look up → assign.

Pure functions of the message, the registry and the settings: no I/O, so a redelivered message
always yields the same event (same ``event_id``, same content).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import JsonValue, ValidationError

from schemas.models import SCHEMA_VERSION, AssignmentEvent, AssignmentRequest
from worker.assignment import BUCKETS, bucket_int
from worker.errors import DeadLetterReason, DecodeError, PermanentError
from worker.ports import Delivery, OutboundEvent
from worker.registry import ExperimentRegistry

#: Namespace for event ids: uuid5(EVENT_NAMESPACE, message_id). Fixed forever: changing it would
#: give redelivered requests new ids and defeat duplicate detection downstream.
EVENT_NAMESPACE = uuid.UUID("6f1c9a52-3a8e-5d7b-9f3e-0c4b2a1d8e77")

#: Default limit on a request body. Service Bus Standard allows 256 KiB; requests are far smaller.
DEFAULT_MAX_BODY_BYTES = 64 * 1024


def event_id_for(message_id: str, member: str | None = None) -> str:
    """Deterministic event id from the request's message id (and the member, for cohorts)."""
    name = message_id if member is None else f"{message_id}\x1f{member}"
    return str(uuid.uuid5(EVENT_NAMESPACE, name))


def decode_request(delivery: Delivery, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> AssignmentRequest:
    """Parse and validate a request body, or raise :class:`PermanentError` saying exactly why."""
    body = delivery.body
    if len(body) > max_body_bytes:
        raise PermanentError(
            DeadLetterReason.MESSAGE_TOO_LARGE,
            f"body is {len(body)} bytes; the limit is {max_body_bytes}",
        )
    data = parse_json_object(body)
    try:
        return AssignmentRequest.model_validate(data)
    except ValidationError as exc:
        raise PermanentError(DeadLetterReason.SCHEMA_VALIDATION_FAILED, describe_validation_error(exc)) from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode UTF-8 JSON whose top level is an object; raise :class:`DecodeError` otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(body, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(body, f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DecodeError(body, "body is not JSON the worker accepts: nested too deeply") from None
    if not isinstance(data, dict):
        raise PermanentError(
            DeadLetterReason.SCHEMA_VALIDATION_FAILED,
            f"body must be a JSON object, got {type(data).__name__}",
        )
    return data


def describe_validation_error(exc: ValidationError) -> str:
    """``field: problem (got value)`` for each error, values shortened so descriptions stay bounded."""
    parts = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(p) for p in error["loc"]) or "(body)"
        got = ""
        if error["type"] != "missing":
            got = f" (got {_short_repr(error.get('input'))})"
        parts.append(f"{field}: {error['msg']}{got}")
    return "; ".join(parts)


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
    """The event for a valid request; :class:`PermanentError` when its experiment is unknown."""
    experiment = registry.get(request.experiment_id)
    if experiment is None:
        raise PermanentError(
            DeadLetterReason.UNKNOWN_EXPERIMENT,
            f"experiment_id {_short_repr(request.experiment_id)} is not configured "
            f"({len(registry)} experiments in {registry.source})",
        )
    segment = request.effective_segment()
    table = experiment.table_for(segment)
    config = experiment.config
    value = bucket_int(config.seed, config.id, request.user_id)
    index = table.index_for(value)
    variant_id = table.variant_ids[index]
    lower, upper = table.thresholds[variant_id]
    ratios = config.segments.get(segment, config.split) if segment is not None else config.split
    return AssignmentEvent(
        schema_version=SCHEMA_VERSION,
        event_id=event_id_for(delivery.message_id),
        request_id=request.request_id,
        correlation_id=delivery.correlation_id or delivery.message_id,
        variant_id=variant_id,
        hash_value=round(value / BUCKETS, 6),
        threshold=(lower, upper),
        experiment_id=config.id,
        experiment_version=config.version,
        user_id=request.user_id,
        segment=segment,
        strategy="md5_hash",
        deterministic=True,
        seed=config.seed,
        split_ratio=dict(ratios),
        variant_metadata=experiment.metadata_for(variant_id),
        context=allowed_context(request.context, context_allow_list),
        assigned_at=delivery.enqueued_time or datetime.now(UTC),
    )


def outbound(event: AssignmentEvent, delivery: Delivery) -> OutboundEvent:
    """The event as a broker message: deterministic id, filterable application properties."""
    return OutboundEvent(
        body=event.model_dump_json().encode(),
        message_id=event.event_id,
        correlation_id=event.correlation_id,
        application_properties={
            "experiment_id": event.experiment_id,
            "variant_id": event.variant_id,
            "schema_version": event.schema_version,
        },
        reply_to=delivery.reply_to,
        reply_to_session_id=delivery.reply_to_session_id,
    )
