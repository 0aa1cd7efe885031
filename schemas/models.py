"""The wire contract: what publishers send, what subscribers receive, what analysts query.

Other services code against these models (or the JSON Schema files generated from them in this
folder). Requests are read tolerantly: unknown top-level fields are ignored so publishers can add
fields before the worker knows them; known fields are validated strictly (no type coercion).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
)

SCHEMA_VERSION = "1.0"

#: Limits on request input. A request over any of them is dead-lettered with the limit named.
MAX_ID_CHARS = 1024
MAX_SEGMENT_CHARS = 256
MAX_CONTEXT_KEYS = 64
MAX_CONTEXT_BYTES = 16 * 1024

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _no_control_chars(value: str) -> str:
    match = _CONTROL_CHARS.search(value)
    if match:
        raise ValueError(f"must not contain control characters (found {match.group()!r} at index {match.start()})")
    return value


#: Ids: 1–1024 characters, no control characters (they break CSV, KQL and log lines downstream).
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_no_control_chars)]
SegmentName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_SEGMENT_CHARS),
    AfterValidator(_no_control_chars),
]
VariantId = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_no_control_chars)]


class AssignmentRequest(BaseModel):
    """One user to assign to one experiment, as published to the requests queue.

    The body is a UTF-8 JSON object. Unknown top-level fields are ignored (tolerant reader).
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    schema_version: Annotated[str, Field(pattern=r"^1\.\d+$")] = Field(
        default=SCHEMA_VERSION,
        description="Contract version the publisher wrote; any 1.x is accepted.",
    )
    request_id: Identifier | None = Field(
        default=None, description="Publisher's own id for the request, echoed in the event."
    )
    user_id: Identifier = Field(description="The unit being assigned (user, customer, device): 1–1024 characters.")
    experiment_id: Identifier = Field(description="An experiment configured in the registry: 1–1024 characters.")
    segment: SegmentName | None = Field(
        default=None,
        description="Segment for per-segment splits. Falls back to context.segment when absent.",
    )
    context: dict[str, JsonValue] | None = Field(
        default=None,
        description=(
            f"Free-form JSON object (at most {MAX_CONTEXT_KEYS} keys and {MAX_CONTEXT_BYTES} bytes encoded). "
            "Only allow-listed keys ever leave the worker: it may hold personal data."
        ),
    )

    @field_validator("context")
    @classmethod
    def _bounded_context(cls, value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        if value is None:
            return None
        if len(value) > MAX_CONTEXT_KEYS:
            raise ValueError(f"has {len(value)} keys; the limit is {MAX_CONTEXT_KEYS}")
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
        if size > MAX_CONTEXT_BYTES:
            raise ValueError(f"is {size} bytes encoded; the limit is {MAX_CONTEXT_BYTES}")
        return value

    def effective_segment(self) -> str | None:
        """``segment``, or ``context.segment`` when that is a non-empty string."""
        if self.segment is not None:
            return self.segment
        candidate = (self.context or {}).get("segment")
        if isinstance(candidate, str) and candidate and len(candidate) <= MAX_SEGMENT_CHARS:
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
        ge=0.0, lt=1.0, description="The user's bucket in [0, 1), 6 decimal places (null for cohort assignments)."
    )
    threshold: tuple[float, float] | None = Field(
        description="The variant's [lower, upper) bucket range (null for cohort assignments)."
    )
    experiment_id: str = Field(description="The experiment.")
    experiment_version: str = Field(description="Version of the experiment configuration that was applied.")
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
        description="UTC. The request's enqueued time when the source has one, so redeliveries agree."
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

    @classmethod
    def from_event(cls, event: AssignmentEvent) -> AssignmentRecord:
        """Flatten an event into its row (empty strings for absent optional values).

        Built without validation: every value comes from an already validated event, and this runs
        once per request on the worker's hot path.
        """
        return cls.model_construct(
            EventId=event.event_id,
            AssignedAt=event.assigned_at,
            ExperimentId=event.experiment_id,
            ExperimentVersion=event.experiment_version,
            UserId=event.user_id,
            VariantId=event.variant_id,
            HashValue=event.hash_value,
            Segment=event.segment or "",
            Strategy=event.strategy,
            Seed=event.seed,
            SplitRatio=event.split_ratio,
            VariantMetadata=event.variant_metadata,
            Context=event.context,
            RequestId=event.request_id or "",
            CorrelationId=event.correlation_id,
            SchemaVersion=event.schema_version,
            ExperimentArm=event.experiment_arm or "",
            CohortId=event.cohort_id or "",
        )

    #: Kusto column types, in column order: used by deploy/kusto and the ingestion mapping.
    @classmethod
    def kusto_columns(cls) -> list[tuple[str, str]]:
        """``[(column, kusto_type)]`` derived from the model's annotations."""
        kinds: dict[Any, str] = {str: "string", float: "real", datetime: "datetime", bool: "bool", int: "long"}
        columns = []
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            # ``X | None`` is the same Kusto type as X: every Kusto column is nullable.
            options = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
            kind = kinds.get(options[0], "dynamic") if len(options) == 1 else "dynamic"
            columns.append((name, kind))
        return columns


#: Limit on members in one cohort message (also bounded by the body size limit).
MAX_COHORT_MEMBERS = 5000


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
    schema_version: Annotated[str, Field(pattern=r"^1\.\d+$")] = Field(default=SCHEMA_VERSION)
    request_id: Identifier | None = Field(default=None, description="Publisher's id; becomes the cohort id.")
    experiment_id: Identifier = Field(description="Experiment label for the cohort (need not be in the registry).")
    arms: list[CohortArm] = Field(min_length=1, max_length=64, description="Arms, in order (order matters).")
    seed: Annotated[str, StringConstraints(min_length=1, max_length=256)] | int = Field(
        default=42, description="Seed of the within-segment ordering (default 42, as the strategy document)."
    )
    tolerance: Annotated[float, Field(ge=0, le=1)] = Field(default=0.05, description="Allowed share deviation.")
    min_per_cell: Annotated[int, Field(ge=0)] = Field(default=5, description="Minimum members per segment × arm.")
    members: list[CohortMember] = Field(min_length=1, description=f"At most {MAX_COHORT_MEMBERS} members.")


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


class ExperimentConfig(BaseModel):
    """One experiment in the registry file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Identifier = Field(description="Experiment id that requests name.")
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        default="1", description="Configuration version, stamped on every event."
    )
    seed: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        default="echovoice", description="Hash seed; changing it reshuffles every user."
    )
    split: dict[VariantId, Ratio] = Field(description="Variant id → share; shares sum to 1.0 (±0.01).", min_length=1)
    variants: dict[VariantId, dict[str, JsonValue]] = Field(
        default_factory=dict, description="Optional metadata per variant, e.g. {tone: urgent}."
    )
    segments: dict[SegmentName, dict[VariantId, Ratio]] = Field(
        default_factory=dict,
        description="Optional split override per segment (segment-specific assignment).",
    )
    description: str = Field(default="", max_length=2000, description="Free text for humans.")


class ExperimentFile(BaseModel):
    """The registry file: a list of experiments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiments: list[ExperimentConfig] = Field(
        min_length=1, description="Configured experiments (at least one); ids must be unique."
    )
