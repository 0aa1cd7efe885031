"""The wire contract of ab-assignment-worker: pydantic v2 models and their JSON Schema files."""

from schemas.models import (
    MAX_CONTEXT_BYTES,
    MAX_CONTEXT_KEYS,
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
    "MAX_CONTEXT_BYTES",
    "MAX_CONTEXT_KEYS",
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
