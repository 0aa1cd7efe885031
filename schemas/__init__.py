"""The wire contract of ab-assignment-worker: pydantic v2 models and their JSON Schema files."""

from schemas.models import (
    MAX_CONTEXT_DEPTH,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_STRING_CHARS,
    MAX_ID_CHARS,
    SCHEMA_VERSION,
    AssignmentEvent,
    AssignmentRecord,
    AssignmentRequest,
    CohortAssignmentRequest,
    CohortReportEvent,
    ExperimentConfig,
    ExperimentFile,
)

__all__ = [
    "MAX_CONTEXT_DEPTH",
    "MAX_CONTEXT_KEYS",
    "MAX_CONTEXT_STRING_CHARS",
    "MAX_ID_CHARS",
    "SCHEMA_VERSION",
    "AssignmentEvent",
    "AssignmentRecord",
    "AssignmentRequest",
    "CohortAssignmentRequest",
    "CohortReportEvent",
    "ExperimentConfig",
    "ExperimentFile",
]
