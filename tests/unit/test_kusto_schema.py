"""deploy/kusto agrees with AssignmentRecord: the table, the JSON mapping, and the functions' names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapters.kusto.sink import DEFAULT_TABLE, MAPPING_NAME, encode_rows
from adapters.local.standins.kusto import json_mappings_from_kql, table_columns_from_kql
from schemas.models import AssignmentRecord
from tests.kusto_artifacts import ALLOCATION_COLUMNS, alter_merge_columns, expected_columns, table_columns

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kusto"


def test_table_has_exactly_the_models_columns_and_types_in_order() -> None:
    """table.kql creates AssignmentEvents with AssignmentRecord.kusto_columns(), nothing more or less.

    Allocation's InExperiment, Reason and ConfigVersion come last, where ``.alter-merge`` adds them to a
    table created before them (expected_columns() adds them while the model does not have them yet).
    """
    tables = table_columns_from_kql((DEPLOY / "table.kql").read_text())

    assert tables == {DEFAULT_TABLE: expected_columns()}
    assert table_columns()[-3:] == ALLOCATION_COLUMNS


def test_an_existing_table_takes_the_allocation_columns_with_an_alter_merge() -> None:
    """``.alter-merge`` adds exactly allocation's columns, with the types the ``.create-merge`` gives them:
    additive (no column dropped or retyped, which .alter-merge refuses), so existing rows keep their data."""
    assert alter_merge_columns() == ALLOCATION_COLUMNS
    assert set(alter_merge_columns()) <= set(table_columns())


def test_mapping_maps_every_column_from_its_own_json_property() -> None:
    """mapping.kql maps each table column from ``$.<Column>``: exactly the keys model_dump writes."""
    mappings = json_mappings_from_kql((DEPLOY / "mapping.kql").read_text())

    assert list(mappings) == [(DEFAULT_TABLE, MAPPING_NAME)]
    columns = [name for name, _ in expected_columns()]
    assert mappings[(DEFAULT_TABLE, MAPPING_NAME)] == [(name, f"$.{name}") for name in columns]


def test_rows_the_sink_writes_have_the_mapped_keys() -> None:
    """The JSON lines the sink sends carry exactly the model's properties, each a mapped one."""
    samples = {"dynamic": {}, "real": 0.5, "datetime": "2026-01-01T00:00:00Z", "string": "x", "bool": True}
    record = AssignmentRecord.model_validate({name: samples[kind] for name, kind in AssignmentRecord.kusto_columns()})

    (line,) = encode_rows([record]).splitlines()
    assert list(json.loads(line)) == [name for name, _ in AssignmentRecord.kusto_columns()]


@pytest.mark.parametrize("name", ["table.kql", "mapping.kql", "retention.kql", "functions.kql", "ingestion.kql"])
def test_every_script_block_is_one_idempotent_command(name: str) -> None:
    """Database scripts run commands separated by blank lines; each block is one re-runnable command."""
    blocks = [b for b in (DEPLOY / name).read_text().split("\n\n") if b.strip()]
    assert blocks
    for block in blocks:
        commands = [line for line in block.splitlines() if line.startswith(".")]
        assert len(commands) == 1, block
        assert re.match(r"\.(create-merge|create-or-alter|alter|alter-merge) ", commands[0]), commands[0]


def test_functions_define_the_dedup_view_and_the_srm_check() -> None:
    """functions.kql defines AssignmentEventsDedup() and AssignmentSrm(experiment, since) over model columns."""
    text = (DEPLOY / "functions.kql").read_text()
    assert re.search(r"^AssignmentEventsDedup\(\) \{", text, re.MULTILINE)
    assert re.search(r"^AssignmentSrm\(experiment: string, since: timespan\) \{", text, re.MULTILINE)
    assert "summarize arg_max(AssignedAt, *) by EventId" in text
    for column in ("ExperimentId", "ExperimentVersion", "Segment", "VariantId", "SplitRatio", "AssignedAt"):
        assert column in dict(AssignmentRecord.kusto_columns())
        assert column in text


def test_srm_critical_values_are_chi_square_at_p_0_001() -> None:
    """The SRM flag's critical values equal scipy's chi-square inverse survival function at 0.001."""
    from scipy.stats import chi2

    text = (DEPLOY / "functions.kql").read_text()
    match = re.search(r"let critical = dynamic\(\[([^\]]+)\]\)", text)
    assert match
    values = [float(v) for v in match.group(1).split(",")]
    assert values == [round(float(chi2.isf(0.001, df)), 3) for df in range(1, 11)]
