"""The wire contract: what publishers send, what subscribers receive, what analysts query.

Other services code against these models (or the JSON Schema files generated from them in this
folder). Requests are read tolerantly: unknown top-level fields are ignored so publishers can add
fields before the worker knows them; known fields are validated strictly (no type coercion).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn, get_args  # Any: pydantic's hooks, JSON Schema documents

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    JsonValue,
    StringConstraints,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from schemas.instants import INSTANT_PATTERN, datetime_of_instant, instant_of, instant_problem
from schemas.text import REFUSED_CLASS, SURROGATE_CLASS, character_problem, surrogate_problem, text_problem

#: The contract's version, stamped on every event and row. The minor version rises when fields are
#: added (1.1: ``in_experiment``, ``reason`` and ``config_version`` on events, their columns on rows);
#: nothing of a 1.x contract is ever removed or changed, and requests of any 1.x are accepted.
SCHEMA_VERSION = "1.1"

#: Limits on request input. A request over any of them is dead-lettered with the limit named; the
#: JSON Schemas state every one of them, so a body the schema accepts is one the worker accepts.
MAX_ID_CHARS = 1024
MAX_SEGMENT_CHARS = 256
MAX_CONTEXT_KEYS = 64
#: Every string in ``context`` (keys and values, at any depth) is at most this long.
MAX_CONTEXT_STRING_CHARS = 1024
#: Arrays and objects nest at most this deep inside ``context`` (``{"a": [[1]]}`` is 2 deep).
MAX_CONTEXT_DEPTH = 4
#: The default limit on a whole request body, which no JSON Schema can state (it is the transport's):
#: the worker setting ``AB_WORKER_MAX_BODY_BYTES``.
MAX_BODY_BYTES = 64 * 1024


class AllowedText:
    """The one text rule of :mod:`schemas.text` as a pydantic annotation: validated and published.

    In the JSON Schema it is ``"not": {"pattern": "[<refused>]"}``: a ``pattern`` that must *not*
    match anywhere, which reads the same in every regex dialect (an anchored ``^...$`` would let a
    trailing newline through Python's ``re``).
    """

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_allowed_text, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["not"] = {"pattern": f"[{REFUSED_CLASS}]"}
        json_schema["$comment"] = "No control, invisible or bidi characters: see schemas/text.py."
        return json_schema


def _allowed_text(value: str) -> str:
    problem = character_problem(value)
    if problem:
        raise ValueError(problem)
    return value


#: Ids: 1–1024 characters, none of the characters :mod:`schemas.text` refuses (they break CSV, KQL,
#: terminals and log lines downstream, or make two different ids look the same).
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AllowedText()]
SegmentName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SEGMENT_CHARS), AllowedText()]
VariantId = Annotated[str, StringConstraints(min_length=1, max_length=256), AllowedText()]
Seed = Annotated[str, StringConstraints(min_length=1, max_length=256), AllowedText()]
#: ``1.x``: ASCII digits only (``\d`` would take any script's digits in some regex dialects).
SchemaVersion = Annotated[str, StringConstraints(pattern=r"^1\.[0-9]+$"), AllowedText()]


#: Why :func:`finite_json_float` refuses a literal (the literal itself is never quoted: it may be context).
OVERFLOWING_NUMBER = "a number beyond the double range (about ±1.8e308), which reads as infinity, and JSON has none"


def finite_json_float(literal: str) -> float:
    """``json.loads``'s ``parse_float``: the literal as a double; ``ValueError`` when it overflows to infinity.

    ``1e400`` is a JSON number by RFC 8259's grammar, but no parser keeps it: Python's reads ``inf``
    (which an event or row then carries as ``null`` while targeting compared infinity), Go's and
    Rust's refuse it. So a request holding one is ``InvalidJson``, as one holding ``Infinity`` is.
    Underflow (``1e-400`` → ``0.0``) rounds as everywhere; integers are exact in Python and kept.
    """
    value = float(literal)
    if math.isinf(value):
        raise ValueError(OVERFLOWING_NUMBER)
    return value


class NotJsonNumber(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python's parser takes them, JSON (RFC 8259) does not."""

    def __init__(self, literal: str) -> None:
        super().__init__(f"{literal} is not a JSON number")
        self.literal = literal


def refuse_json_constant(literal: str) -> NoReturn:
    """``json.loads``'s ``parse_constant``: :class:`NotJsonNumber`, so a request holding one is ``InvalidJson``.

    The JSON Schema and other languages' parsers refuse these literals, so the worker, the CLI and its
    input files refuse them alike (an AMQP value body holding one is refused too: adapters.servicebus.convert).
    """
    raise NotJsonNumber(literal)


def context_problem(value: JsonValue, depth: int = 0) -> str | None:
    """Why a context value breaks the limits (string length, nesting depth, lone surrogates), or ``None``.

    The problem, then where it is (:class:`ContextProblem`): never the offending value itself.
    """
    found = located_context_problem(value, depth)
    return None if found is None else str(found)


@dataclass(frozen=True, slots=True)
class ContextProblem:
    """Where a request's context breaks a limit, and how: a key path and a problem, never a value.

    Context may hold personal data and leaves the worker only for allow-listed keys, while a problem's
    text travels far (dead-letter descriptions, ``dlq peek``, replayed copies' properties, CLI errors).
    ``path`` follows ``context``: ``.email`` names a top-level key (escaped and bounded when it is not
    a plain name); below it, list items are ``[i]`` and object keys ``.(key n)`` by position, as a
    nested key may itself be personal (a map keyed by e-mail address). A key that breaks a limit is
    named by position only.
    """

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.problem} (at context{self.path})" if self.path else self.problem


def located_context_problem(value: JsonValue, depth: int = 0, path: str = "") -> ContextProblem | None:
    """The first place a context value breaks the limits, and why; ``None`` when it keeps them.

    ``path`` is where ``value`` sits (``""``: it is the context itself, so its keys are top-level keys).
    """
    found = _problem_within(value, depth, top=not path)
    return found if found is None or not path else ContextProblem(path + found.path, found.problem)


def _problem_within(value: JsonValue, depth: int, *, top: bool) -> ContextProblem | None:
    # The path is built only on the way back from a problem: a context that keeps the limits (every
    # request's, checked as it is validated) costs no string formatting.
    if isinstance(value, str):
        problem = _string_problem(value)
        return None if problem is None else ContextProblem("", problem)
    if not isinstance(value, list | dict):
        return None
    if depth > MAX_CONTEXT_DEPTH:
        return ContextProblem("", f"nests deeper than {MAX_CONTEXT_DEPTH} levels")
    if isinstance(value, dict):
        return _problem_in_object(value, depth, top=top)
    for index, item in enumerate(value):
        found = _problem_within(item, depth + 1, top=False)
        if found:
            return ContextProblem(f"[{index}]{found.path}", found.problem)
    return None


def _problem_in_object(value: dict[str, JsonValue], depth: int, *, top: bool) -> ContextProblem | None:
    for position, key in enumerate(value, 1):
        problem = _string_problem(key)
        if problem:
            return ContextProblem("", f"key {position} {problem}")
    for position, (key, item) in enumerate(value.items(), 1):
        found = _problem_within(item, depth + 1, top=False)
        if found:
            step = _top_key_step(key) if top else f".(key {position})"
            return ContextProblem(step + found.path, found.problem)
    return None


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _top_key_step(key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f".{key}"
    shown = json.dumps(key)  # escapes quotes, control and non-ASCII characters
    return f"[{shown}]" if len(shown) <= 66 else f"[{shown[:64]}…]"


def json_surrogate_problem(value: JsonValue) -> str | None:
    """The first lone surrogate in a JSON value's strings and keys, at any depth, or ``None``."""
    if isinstance(value, str):
        return surrogate_problem(value)
    if isinstance(value, dict):
        return next(filter(None, (surrogate_problem(k) or json_surrogate_problem(v) for k, v in value.items())), None)
    if isinstance(value, list):
        return next(filter(None, map(json_surrogate_problem, value)), None)
    return None


def _string_problem(text: str) -> str | None:
    if len(text) > MAX_CONTEXT_STRING_CHARS:
        return f"holds a {len(text)}-character string; the limit is {MAX_CONTEXT_STRING_CHARS}"
    return surrogate_problem(text)


#: Every string in ``context``, keys included, as JSON Schema states it.
CONTEXT_STRING: dict[str, Any] = {"maxLength": MAX_CONTEXT_STRING_CHARS, "not": {"pattern": f"[{SURROGATE_CLASS}]"}}


class BoundedContext:
    """``context``: at most 64 keys, strings of at most 1,024 characters, nesting at most 4 deep.

    Published as ``$defs/ContextValue1`` … ``ContextValue{MAX_CONTEXT_DEPTH + 1}``: one definition per
    level, the deepest holding only scalars, because JSON Schema has no keyword for depth.
    """

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_bounded_context, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "object",
            "maxProperties": MAX_CONTEXT_KEYS,
            "propertyNames": CONTEXT_STRING,
            "additionalProperties": {"$ref": f"{REQUEST_SCHEMA_ID}#/$defs/ContextValue1"},
        }


def _bounded_context(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    problem = request_context_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def request_context_problem(value: object) -> str | None:
    """Why parsed JSON ``value`` cannot be a request's ``context``, or ``None``: :class:`BoundedContext`'s limits.

    For contexts that reach the rule by another road than a request body (``ab-worker assign
    --context``, a file's ``context`` column), so they are refused exactly as the worker refuses them.
    """
    if not isinstance(value, dict):
        return f"must be a JSON object, got {_json_kind(value)}"
    if len(value) > MAX_CONTEXT_KEYS:
        return f"has {len(value)} keys; the limit is {MAX_CONTEXT_KEYS}"
    # The common context is flat: its keys and string values checked in one pass each, in C (a file
    # of contexts is checked row by row); a nested one, or one with a problem, gets the full walk.
    strings = [*value]
    for item in value.values():
        if type(item) is str:
            strings.append(item)
        elif isinstance(item, list | dict | str):
            return context_problem(value)
    if max(map(len, strings), default=0) <= MAX_CONTEXT_STRING_CHARS and surrogate_problem("".join(strings)) is None:
        return None
    return context_problem(value)


def request_context_located_problem(value: object) -> ContextProblem | None:
    """:func:`request_context_problem`, with the key path apart: for a dead-letter description."""
    if not isinstance(value, dict) or len(value) > MAX_CONTEXT_KEYS:
        problem = request_context_problem(value)  # about the whole context: no path
        return None if problem is None else ContextProblem("", problem)
    return located_context_problem(value)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else type(value).__name__


def context_value_definitions() -> dict[str, JsonSchemaValue]:
    """The ``$defs`` that :class:`BoundedContext` refers to: one per nesting level."""
    scalars: list[JsonSchemaValue] = [
        {"type": "null"},
        {"type": "boolean"},
        {"type": "number"},
        {"type": "string", **CONTEXT_STRING},
    ]
    definitions: dict[str, JsonSchemaValue] = {}
    for level in range(1, MAX_CONTEXT_DEPTH + 2):
        if level > MAX_CONTEXT_DEPTH:
            definitions[f"ContextValue{level}"] = {"anyOf": scalars}
            continue
        inner = {"$ref": f"{REQUEST_SCHEMA_ID}#/$defs/ContextValue{level + 1}"}
        containers: list[JsonSchemaValue] = [
            {"type": "array", "items": inner},
            {
                "type": "object",
                "propertyNames": CONTEXT_STRING,
                "additionalProperties": inner,
            },
        ]
        definitions[f"ContextValue{level}"] = {"anyOf": scalars + containers}
    return definitions


#: Base of every schema file's ``$id``: a name for the contract, not a download location (the files
#: ship in ``schemas/`` and in the package). ``.invalid`` is reserved: it can never resolve elsewhere.
SCHEMA_BASE_URI = "https://ab-assignment-worker.invalid/schemas/"
REQUEST_SCHEMA_ID = f"{SCHEMA_BASE_URI}assignment-request.schema.json"


def _add_context_definitions(schema: dict[str, Any]) -> None:
    # The context definitions are referred to by absolute URI (the schema's own $id), so pydantic,
    # which tracks only the definitions it made itself, leaves the references alone.
    schema["$id"] = REQUEST_SCHEMA_ID
    schema.setdefault("$defs", {}).update(context_value_definitions())


class AssignmentRequest(BaseModel):
    """One user to assign to one experiment, as published to the requests queue.

    The body is a UTF-8 JSON object of at most 64 KiB by default (the worker's
    ``AB_WORKER_MAX_BODY_BYTES``: the one limit a JSON Schema cannot state). Unknown top-level fields
    are ignored (tolerant reader); every limit on known fields is in this schema.
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, json_schema_extra=_add_context_definitions)

    schema_version: SchemaVersion = Field(
        default=SCHEMA_VERSION,
        description="Contract version the publisher wrote; any 1.x is accepted.",
    )
    request_id: Identifier | None = Field(
        default=None, description="Publisher's own id for the request, echoed in the event."
    )
    user_id: Identifier = Field(
        description=(
            "The unit being assigned (user, customer, device): 1–1024 characters, none of the refused "
            "ones. Hashed as its exact UTF-8 bytes, with no Unicode normalisation: publish NFC."
        )
    )
    experiment_id: Identifier = Field(description="An experiment configured in the registry: 1–1024 characters.")
    segment: SegmentName | None = Field(
        default=None,
        description="Segment for per-segment splits. Falls back to context.segment when absent.",
    )
    context: Annotated[dict[str, JsonValue], BoundedContext()] | None = Field(
        default=None,
        description=(
            f"Free-form JSON object: at most {MAX_CONTEXT_KEYS} keys, strings (keys and values) of at most "
            f"{MAX_CONTEXT_STRING_CHARS} characters, arrays and objects nested at most {MAX_CONTEXT_DEPTH} deep. "
            "Only allow-listed keys ever leave the worker: it may hold personal data."
        ),
    )

    def effective_segment(self) -> str | None:
        """``segment``, or ``context.segment`` when that is a valid segment name (:func:`effective_segment`)."""
        return effective_segment(self.segment, self.context)


def effective_segment(segment: str | None, context: object) -> str | None:
    """The segment a request is decided with: ``segment``, else ``context["segment"]`` when that is a
    valid segment name, else none (``docs/allocation.md`` §2.3). One rule for the worker and the API."""
    if segment is not None:
        return segment
    candidate = context.get("segment") if isinstance(context, Mapping) else None
    if isinstance(candidate, str) and text_problem(candidate, MAX_SEGMENT_CHARS) is None:
        return candidate
    return None


class AssignmentEvent(BaseModel):
    """The assignment, as published to the events topic and returned to ``reply_to``.

    Everything ``ABAssignmentAgent.assign_user`` returns, plus where it came from. A redelivered
    request yields an identical event with the same ``event_id``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: str = Field(default=SCHEMA_VERSION, description="Contract version of this event.")
    event_id: str = Field(
        description="Deterministic id (UUIDv5 of the request's message id): the same request always gives the same id."
    )
    request_id: str | None = Field(default=None, description="The request's request_id, if it had one.")
    correlation_id: str = Field(description="The request message's correlation id, else its message id.")
    variant_id: str = Field(description="The assigned variant.")
    hash_value: float | None = Field(
        ge=0.0,
        lt=1.0,
        description=(
            "The user's bucket in [0, 1), 6 decimal places; null unless reason is bucketed (no variant hash "
            "decided the others) and for cohort assignments."
        ),
    )
    threshold: tuple[float, float] | None = Field(
        description="The variant's [lower, upper) bucket range; null unless reason is bucketed, and for cohorts."
    )
    in_experiment: bool = Field(
        description=(
            "True when the user counts in the experiment's results (reason bucketed, or stratified for cohorts); "
            "false when a gate served the experiment's control, an override or the launched variant."
        )
    )
    reason: str = Field(
        description=(
            "Which step decided (docs/allocation.md): override, draft, stopped, launched, not_started, ended, "
            "targeting, holdout, layer, coverage or bucketed; stratified for cohort assignments."
        )
    )
    experiment_id: str = Field(description="The experiment.")
    experiment_version: str = Field(description="Version of the experiment configuration that was applied.")
    config_version: str = Field(
        description=(
            "Digest of everything that decided the experiment's assignments (16 hex digits, docs/allocation.md "
            "§2.8): it changes when, and only when, the decision could; empty for cohort assignments."
        )
    )
    user_id: str = Field(description="The assigned user.")
    segment: str | None = Field(default=None, description="Segment used to choose the split, if any.")
    strategy: Literal["md5_hash", "stratified_random"] = Field(description="How the variant was chosen.")
    deterministic: bool = Field(description="True: recomputing from seed, experiment and user gives the same variant.")
    seed: str = Field(description="Hash seed, so anyone can reproduce the bucket.")
    experiment_arm: str | None = Field(default=None, description="Cohort assignments: the arm the member is in.")
    cohort_id: str | None = Field(
        default=None, description="Cohort assignments: the cohort request's request_id, else its message id."
    )
    split_ratio: dict[str, float] = Field(
        description="The split that was applied (the segment's, if overridden; arm target shares for cohorts)."
    )
    variant_metadata: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="The variant's metadata from the experiment configuration (e.g. tone).",
    )
    context: dict[str, JsonValue] = Field(
        default_factory=dict, description="Only the allow-listed keys of the request's context."
    )
    assigned_at: datetime = Field(
        description=(
            "UTC. The time the request was decided at: its enqueued time when the source has one, or for a "
            "copy replayed from the dead-letter queue the original's (ab_replay_original_enqueued_time), so "
            "redeliveries and replays agree."
        )
    )


class AssignmentRecord(BaseModel):
    """One row of the Kusto table ``AssignmentEvents`` (PascalCase columns, Kusto-mappable types).

    Types: string → ``string``, float → ``real``, datetime → ``datetime``, dict → ``dynamic``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    EventId: str
    AssignedAt: datetime
    ExperimentId: str
    ExperimentVersion: str
    UserId: str
    VariantId: str
    HashValue: float | None
    Segment: str
    Strategy: str
    Seed: str
    SplitRatio: dict[str, float]
    VariantMetadata: dict[str, JsonValue]
    Context: dict[str, JsonValue]
    RequestId: str
    CorrelationId: str
    SchemaVersion: str
    ExperimentArm: str
    CohortId: str
    #: Appended last: Kusto's ``.alter-merge`` adds columns at the end of the table.
    InExperiment: bool
    Reason: str
    ConfigVersion: str

    @classmethod
    def from_event(cls, event: AssignmentEvent) -> AssignmentRecord:
        """Flatten an event into its row (empty strings for absent optional values).

        Built without validation: every value comes from an already validated event, and this runs
        once per request on the worker's hot path. It does what ``model_construct`` does with every
        field given (the instance's ``__dict__``, fields set, no extra, no private attributes),
        without ``model_construct``'s per-field pass over the defaults: about half its time a row (2.1 µs
        against 4.3 µs), which pays for the three fields allocation added to every event and row. A test holds it
        equal, field for field and byte for byte, to the validated model.
        """
        record = cls.__new__(cls)
        _object_setattr(
            record,
            "__dict__",
            {
                "EventId": event.event_id,
                "AssignedAt": event.assigned_at,
                "ExperimentId": event.experiment_id,
                "ExperimentVersion": event.experiment_version,
                "UserId": event.user_id,
                "VariantId": event.variant_id,
                "HashValue": event.hash_value,
                "Segment": event.segment or "",
                "Strategy": event.strategy,
                "Seed": event.seed,
                "SplitRatio": event.split_ratio,
                "VariantMetadata": event.variant_metadata,
                "Context": event.context,
                "RequestId": event.request_id or "",
                "CorrelationId": event.correlation_id,
                "SchemaVersion": event.schema_version,
                "ExperimentArm": event.experiment_arm or "",
                "CohortId": event.cohort_id or "",
                "InExperiment": event.in_experiment,
                "Reason": event.reason,
                "ConfigVersion": event.config_version,
            },
        )
        _object_setattr(record, "__pydantic_fields_set__", _RECORD_FIELDS.copy())  # its own: model_copy updates it
        _object_setattr(record, "__pydantic_extra__", None)
        _object_setattr(record, "__pydantic_private__", None)
        return record

    #: Kusto column types, in column order: used by deploy/kusto and the ingestion mapping.
    @classmethod
    def kusto_columns(cls) -> list[tuple[str, str]]:
        """``[(column, kusto_type)]`` derived from the model's annotations."""
        kinds: dict[object, str] = {str: "string", float: "real", datetime: "datetime", bool: "bool", int: "long"}
        columns = []
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            # ``X | None`` is the same Kusto type as X: every Kusto column is nullable.
            options = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
            kind = kinds.get(options[0], "dynamic") if len(options) == 1 else "dynamic"
            columns.append((name, kind))
        return columns


_object_setattr = object.__setattr__
#: Every column of a row: all are set by :meth:`AssignmentRecord.from_event`.
_RECORD_FIELDS = set(AssignmentRecord.model_fields)


#: Limit on members in one cohort message (also bounded by the body size limit).
MAX_COHORT_MEMBERS = 5000


#: "All arms weighted or none": JSON Schema's form of the worker's rule (a null weight is no weight).
_EVERY_ARM_WEIGHTED_OR_NONE: list[JsonValue] = [
    {"items": {"required": ["weight"], "properties": {"weight": {"type": "number"}}}},
    {"items": {"properties": {"weight": {"type": "null"}}}},
]


class CohortMember(BaseModel):
    """One member of a cohort."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    member_id: Identifier = Field(description="The unit being assigned (customer id).")
    segment: SegmentName = Field(description="Stratum the member is randomised within.")


class CohortArm(BaseModel):
    """One arm of a cohort experiment."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: VariantId = Field(description="Arm id, e.g. control or treatment_1.")
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="Relative weight (all arms or none; equal when none)."
    )
    variants_by_segment: dict[SegmentName, VariantId] | None = Field(
        default=None, description="Variant per segment for this arm (e.g. a tone); the arm id otherwise."
    )


class CohortAssignmentRequest(BaseModel):
    """A whole known cohort to assign by stratified randomisation (``kind: "cohort"``).

    Produces one assignment event per member and one cohort report event. Replaying the same
    message yields identical events.
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    kind: Literal["cohort"] = Field(description='Always "cohort": tells the worker this is a cohort request.')
    schema_version: SchemaVersion = Field(default=SCHEMA_VERSION)
    request_id: Identifier | None = Field(default=None, description="Publisher's id; becomes the cohort id.")
    experiment_id: Identifier = Field(description="Experiment label for the cohort (need not be in the registry).")
    arms: list[CohortArm] = Field(
        min_length=1,
        max_length=64,
        description="Arms, in order (order matters). Weights: on every arm, or on none (equal shares).",
        json_schema_extra={"anyOf": _EVERY_ARM_WEIGHTED_OR_NONE},
    )
    seed: Seed | int = Field(
        default=42, description="Seed of the within-segment ordering (default 42, as the strategy document)."
    )
    tolerance: Annotated[float, Field(ge=0, le=1)] = Field(default=0.05, description="Allowed share deviation.")
    min_per_cell: Annotated[int, Field(ge=0)] = Field(default=5, description="Minimum members per segment × arm.")
    members: list[CohortMember] = Field(
        min_length=1,
        description=(
            f"At most {MAX_COHORT_MEMBERS} members (more: CohortTooLarge), and the whole body within the worker's "
            f"body limit ({MAX_BODY_BYTES // 1024} KiB by default, so about 1,300 members of "
            '{"member_id": "C000001", "segment": "Standard"}; more: MessageTooLarge). '
            "Raise AB_WORKER_MAX_BODY_BYTES (up to the queue's message size) to send up to the member limit."
        ),
        # Stated here, checked by the worker after parsing so that it is dead-lettered as CohortTooLarge.
        json_schema_extra={"maxItems": MAX_COHORT_MEMBERS},
    )


class CohortReportEvent(BaseModel):
    """The balance report of one cohort assignment, published beside its member events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: str = Field(default=SCHEMA_VERSION)
    event_type: Literal["cohort_report"] = Field(default="cohort_report")
    event_id: str = Field(description="Deterministic id from the cohort message id.")
    cohort_id: str = Field(description="request_id, else the message id.")
    correlation_id: str = Field(description="The request's correlation id, else its message id.")
    experiment_id: str
    seed: str
    member_count: int
    passed: bool = Field(description="True when every balance check passed.")
    report: dict[str, JsonValue] = Field(description="Segment × arm table and each check with offending cells.")
    assigned_at: datetime


Ratio = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
#: A share of users in [0, 1] (coverage, a holdout's share, a layer range's ends): a JSON number,
#: never a boolean or a numeric string (unlike the split's ratios, which keep today's leniency).
Share = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]
#: Layer and holdout ids, and their salts: short ids under the one text rule.
GroupId = Annotated[str, StringConstraints(min_length=1, max_length=256), AllowedText()]
Status = Literal["draft", "running", "stopped", "launched"]
EXPERIMENTS_SCHEMA_ID = f"{SCHEMA_BASE_URI}experiments.schema.json"
#: Targeting conditions nest at most this deep (each ``$and``, ``$or`` or ``$not`` is one level).
MAX_CONDITION_DEPTH = 8
#: Overrides per experiment: QA accounts, not a population (use targeting for one).
MAX_OVERRIDES = 10_000
#: Versions (``docs/allocation.md`` §2.7) are at most this long.
MAX_VERSION_CHARS = 256
_NUMBER_PART = r"(0|[1-9][0-9]*)"
_PRERELEASE_PART = r"(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
#: A semantic version as the contract reads it: 1–3 core numbers, optional pre-release and build.
VERSION_PATTERN = (
    rf"^{_NUMBER_PART}(\.{_NUMBER_PART}){{0,2}}(-{_PRERELEASE_PART}(\.{_PRERELEASE_PART})*)?"
    r"(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)
#: Python's ``$`` matches before a final newline; this keeps such strings out in every dialect.
_NO_NEWLINE: dict[str, Any] = {"not": {"pattern": "\n"}}


class Instant:
    """A time of the contract (``schemas/instants.py``): an RFC 3339 string with a zone, or an aware
    ``datetime`` as YAML reads an unquoted one. Normalised to UTC and floored to the microsecond; naive
    times, bare dates and numbers are refused."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(_to_instant)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "date-time", "pattern": INSTANT_PATTERN, **_NO_NEWLINE}


def _to_instant(value: object) -> datetime:
    problem = instant_problem(value)
    micros = instant_of(value)
    if problem or micros is None:
        raise ValueError(problem or "is not a time")
    return datetime_of_instant(micros)


class ConditionSchema:
    """A targeting condition: any JSON object here (YAML times included); ``worker.domain.allocation``
    compiles it at load and reports every error. The JSON Schema states its whole grammar."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.dict_schema(core_schema.str_schema(), core_schema.any_schema())

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"$ref": f"{EXPERIMENTS_SCHEMA_ID}#/$defs/Condition0"}


def condition_definitions() -> dict[str, JsonSchemaValue]:
    """``$defs`` for targeting conditions: one ``Condition{n}`` per nesting level (JSON Schema has no depth keyword)."""

    def ref(name: str) -> JsonSchemaValue:
        return {"$ref": f"{EXPERIMENTS_SCHEMA_ID}#/$defs/{name}"}

    text: JsonSchemaValue = {"type": "string", "maxLength": MAX_CONTEXT_STRING_CHARS, **CONTEXT_STRING}
    scalar: JsonSchemaValue = {"anyOf": [text, {"type": "number"}, {"type": "boolean"}]}
    scalars: JsonSchemaValue = {"type": "array", "minItems": 1, "items": ref("ConditionScalar")}
    time: JsonSchemaValue = {"type": "string", "pattern": INSTANT_PATTERN, **_NO_NEWLINE}
    ordered: JsonSchemaValue = {"anyOf": [{"type": "number"}, time]}
    version: JsonSchemaValue = {
        "type": "string",
        "maxLength": MAX_VERSION_CHARS,
        "pattern": VERSION_PATTERN,
        **_NO_NEWLINE,
    }
    operators: dict[str, JsonSchemaValue] = {
        "$eq": ref("ConditionScalar"),
        "$ne": ref("ConditionScalar"),
        "$in": scalars,
        "$nin": scalars,
        **dict.fromkeys(("$gt", "$gte", "$lt", "$lte"), ordered),
        "$exists": {"type": "boolean"},
        **dict.fromkeys(("$veq", "$vgt", "$vgte", "$vlt", "$vlte"), version),
    }
    definitions: dict[str, JsonSchemaValue] = {
        "ConditionScalar": scalar,
        "ConditionOperators": {
            "type": "object",
            "minProperties": 1,
            "properties": operators,
            "additionalProperties": False,
        },
    }
    attribute_test = {"anyOf": [ref("ConditionScalar"), ref("ConditionOperators")]}
    for level in range(MAX_CONDITION_DEPTH + 1):
        properties: dict[str, JsonSchemaValue] = {}
        if level < MAX_CONDITION_DEPTH:
            inner = ref(f"Condition{level + 1}")
            properties = {
                "$and": {"type": "array", "minItems": 1, "items": inner},
                "$or": {"type": "array", "minItems": 1, "items": inner},
                "$not": inner,
            }
        definitions[f"Condition{level}"] = {
            "type": "object",
            "description": "Every key must match: $and/$or/$not, or an attribute name with a value or operators.",
            "propertyNames": {"minLength": 1, **CONTEXT_STRING},
            "properties": properties,
            "patternProperties": {"^[^$]": attribute_test},
            "additionalProperties": False,
        }
    return definitions


class Layer(BaseModel):
    """A layer: experiments in one layer take disjoint slices of it, so they never share a user."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: GroupId = Field(description="Layer id that experiments name in layer.id.")
    salt: GroupId | None = Field(default=None, description="Salt of the layer hash; default the id.")


class Holdout(BaseModel):
    """A holdout: a share of all users held out of every experiment that lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: GroupId = Field(description="Holdout id that experiments list in holdouts.")
    salt: GroupId | None = Field(default=None, description="Salt of the holdout hash; default the id.")
    share: Share = Field(description="Share of users held out, in [0, 1].")


class LayerSlot(BaseModel):
    """An experiment's slice of a layer: users whose layer hash is in [lo, hi)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: GroupId = Field(description="A layer declared in the file's layers.")
    range: tuple[Share, Share] = Field(description="[lo, hi] with 0 <= lo < hi <= 1; the slice is lo <= hash < hi.")

    @field_validator("range")
    @classmethod
    def _not_empty(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"must be [lo, hi] with lo < hi, got [{value[0]!r}, {value[1]!r}]")
        return value


class ExperimentConfig(BaseModel):
    """One experiment in the registry file (allocation fields: ``docs/allocation.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"allOf": [
        {"if": {"properties": {"status": {"const": "launched"}}, "required": ["status"]},
         "then": {"required": ["launched"]}},
        {"if": {"required": ["launched"]},
         "then": {"properties": {"status": {"const": "launched"}}, "required": ["status"]}},
    ]})  # fmt: skip

    id: Identifier = Field(description="Experiment id that requests name.")
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        default="1", description="Configuration version, stamped on every event."
    )
    seed: Seed = Field(default="echovoice", description="Hash seed; changing it reshuffles every user.")
    split: dict[VariantId, Ratio] = Field(description="Variant id → share; shares sum to 1.0 (±0.01).", min_length=1)
    variants: dict[VariantId, dict[str, JsonValue]] = Field(
        default_factory=dict, description="Optional metadata per variant, e.g. {tone: urgent}."
    )
    segments: dict[SegmentName, dict[VariantId, Ratio]] = Field(
        default_factory=dict,
        description="Optional split override per segment (segment-specific assignment).",
    )
    description: str = Field(default="", max_length=2000, description="Free text for humans.")
    control: VariantId | None = Field(
        default=None,
        description=(
            "Variant served to users not in the experiment; default the variant named control if the split "
            "has one, else the first variant id in sorted order."
        ),
    )
    status: Status = Field(
        default="running",
        description="draft (overrides only), running, stopped (everyone control), launched (everyone `launched`).",
    )
    launched: VariantId | None = Field(
        default=None, description="The variant everyone gets; required with status launched, refused otherwise."
    )
    start_at: Annotated[datetime, Instant()] | None = Field(
        default=None, description="First instant of the experiment (inclusive), with a zone: 2026-12-01T00:00:00Z."
    )
    end_at: Annotated[datetime, Instant()] | None = Field(
        default=None, description="End of the experiment (exclusive), with a zone; later than start_at."
    )
    coverage: Share = Field(default=1.0, description="Share of eligible users exposed, in [0, 1]; default 1.")
    layer: LayerSlot | None = Field(default=None, description="The experiment's slice of a layer.")
    holdouts: list[GroupId] = Field(
        default_factory=list,
        description="Holdouts that hold users out of this experiment.",
        json_schema_extra={"uniqueItems": True},
    )
    targeting: Annotated[dict[str, Any], ConditionSchema()] | None = Field(
        default=None, description="Condition on the request's context and segment (docs/allocation.md §2.5)."
    )
    overrides: dict[Identifier, VariantId] = Field(
        default_factory=dict,
        description="User id → variant, for QA accounts, while the status is draft or running.",
        json_schema_extra={"maxProperties": MAX_OVERRIDES},
    )

    @field_validator("variants")
    @classmethod
    def _variants_encodable(cls, value: dict[str, dict[str, JsonValue]]) -> dict[str, dict[str, JsonValue]]:
        # Stamped on every event: a lone surrogate (a "\ud800" escape in JSON or YAML) would make each
        # of them impossible to serialise, so it is refused when the file is loaded.
        problem = json_surrogate_problem(dict(value))
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides_bounded(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_OVERRIDES:
            raise ValueError(f"has {len(value)} entries; the limit is {MAX_OVERRIDES} (use targeting for populations)")
        return value


class ExperimentFile(BaseModel):
    """The registry file: layers, holdouts and a list of experiments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[Layer] = Field(default_factory=list, description="Layers (mutual exclusion); ids must be unique.")
    holdouts: list[Holdout] = Field(default_factory=list, description="Holdouts; ids must be unique.")
    experiments: list[ExperimentConfig] = Field(
        min_length=1, description="Configured experiments (at least one); ids must be unique."
    )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The schema with the targeting grammar's ``$defs`` (pydantic replaces ``$defs`` after json_schema_extra)."""
        schema = super().model_json_schema(*args, **kwargs)
        schema.setdefault("$defs", {}).update(condition_definitions())
        return schema
