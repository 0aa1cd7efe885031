"""Readers of deploy/kusto shared by the schema, dashboard and name tests: columns, functions, their outputs.

No KQL engine runs here (the Kusto stand-in ingests and answers management commands; it does not
evaluate queries), so the scripts are read as text, by the shapes they are written in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from adapters.local.standins.kusto import table_columns_from_kql
from schemas.models import AssignmentRecord

KUSTO = Path(__file__).resolve().parents[1] / "deploy" / "kusto"
TABLE = "AssignmentEvents"

#: The columns allocation (issue 18) added to AssignmentEvents, with their Kusto types, in table order.
ALLOCATION_COLUMNS = [("InExperiment", "bool"), ("Reason", "string"), ("ConfigVersion", "string")]


def expected_columns() -> list[tuple[str, str]]:
    """The table's columns: the model's, with allocation's three last (where ``.alter-merge`` puts them
    on a table created before them), whether or not the model has them yet."""
    allocation = {name for name, _ in ALLOCATION_COLUMNS}
    return [c for c in AssignmentRecord.kusto_columns() if c[0] not in allocation] + ALLOCATION_COLUMNS


def table_columns() -> list[tuple[str, str]]:
    """The columns deploy/kusto/table.kql creates AssignmentEvents with."""
    return table_columns_from_kql((KUSTO / "table.kql").read_text(encoding="utf-8"))[TABLE]


def alter_merge_columns() -> list[tuple[str, str]]:
    """The columns of table.kql's ``.alter-merge table AssignmentEvents (...)`` (what an existing table takes)."""
    text = (KUSTO / "table.kql").read_text(encoding="utf-8")
    (columns,) = re.findall(rf"^\.alter-merge table {TABLE} \(([^)]*)\)", text, re.M)
    return [(name.strip(), kind.strip()) for name, _, kind in (part.partition(":") for part in columns.split(","))]


@dataclass(frozen=True, slots=True)
class Function:
    """One stored function of functions.kql: its name, parameter list text and body (braces included)."""

    name: str
    parameters: str
    body: str

    def output_columns(self) -> list[str]:
        """The columns the body's last ``| project`` names (empty when it ends otherwise)."""
        lines = self.body.strip().removeprefix("{").removesuffix("}").splitlines()
        code = "\n".join(line for line in lines if not line.strip().startswith("//"))
        if "| project " not in code:
            return []
        tail = code[code.rindex("| project ") + len("| project ") :]
        tail = re.split(r"\n\s*\|", tail)[0]
        return [part.split("=")[0].strip() for part in tail.split(",")]


def functions() -> dict[str, Function]:
    """Every function functions.kql defines, by name, in file order."""
    text = (KUSTO / "functions.kql").read_text(encoding="utf-8")
    found = re.finditer(r"^(\w+)\(([^\n]*)\) (\{.*?^\})", text, re.M | re.S)
    return {m.group(1): Function(m.group(1), m.group(2), m.group(3)) for m in found}
