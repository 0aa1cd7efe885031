"""Write the JSON Schema files other services code against: ``python -m schemas.generate``.

A test fails when the committed files differ from what the models generate, so they never go stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.models import (
    SCHEMA_BASE_URI,
    AssignmentEvent,
    AssignmentRequest,
    CohortAssignmentRequest,
    CohortReportEvent,
    ExperimentFile,
)

HERE = Path(__file__).parent
SCHEMA_FILES: dict[str, type[BaseModel]] = {
    "assignment-request.schema.json": AssignmentRequest,
    "assignment-event.schema.json": AssignmentEvent,
    "experiments.schema.json": ExperimentFile,
    "cohort-request.schema.json": CohortAssignmentRequest,
    "cohort-report-event.schema.json": CohortReportEvent,
}


def render(model: type[BaseModel], name: str) -> str:
    """The JSON Schema of ``model``, published as file ``name``, as stable, pretty-printed text."""
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"{SCHEMA_BASE_URI}{name}"
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    """Regenerate every schema file in this folder."""
    for name, model in SCHEMA_FILES.items():
        (HERE / name).write_text(render(model, name), encoding="utf-8")
        print(f"wrote schemas/{name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
