"""docs/configuration.md is what the settings model generates, so it cannot drift from the settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from worker.cli import report
from worker.service import configuration_page
from worker.service.settings import WorkerSettings

PAGE = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_the_committed_page_is_what_the_model_generates() -> None:
    """A field added, renamed or re-described without `make docs` fails here."""
    assert PAGE.read_text(encoding="utf-8") == configuration_page.render(), "docs/configuration.md is stale: make docs"


def test_every_setting_has_a_row_with_a_description() -> None:
    """One row per field, none with an empty meaning."""
    rows = [line for line in configuration_page.render().splitlines() if line.startswith("| `")]
    assert len(rows) == len(WorkerSettings.model_fields)
    assert [name for name, field in WorkerSettings.model_fields.items() if not field.description] == []


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("AB_WORKER_MAX_BATCH", "max_batch"),
        ("AB_WORKER_FLUSH_MAX_AGE", "flush_max_age"),
        ("AB_WORKER_KUSTO_MAX_AGE", "flush_max_age"),
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", "applicationinsights_connection_string"),
    ],
)
def test_the_variables_the_page_names_are_the_ones_the_model_reads(
    monkeypatch: pytest.MonkeyPatch, variable: str, field: str
) -> None:
    """Each name in a row sets that field: the prefix, an alias, a former name."""
    assert f"`{variable}`" in configuration_page.row(field, WorkerSettings.model_fields[field])
    monkeypatch.setenv(variable, "7")
    read = getattr(WorkerSettings(), field)
    assert str(read.get_secret_value() if isinstance(read, SecretStr) else read) in {"7", "7.0"}


def test_defaults_and_bounds_are_the_models() -> None:
    """The default and the accepted range come from the field, not from prose."""
    row = configuration_page.row("max_batch", WorkerSettings.model_fields["max_batch"])
    assert "| `100` | integer ≥ 1, ≤ 5,000 |" in row
    row = configuration_page.row("telemetry", WorkerSettings.model_fields["telemetry"])
    assert "| `none` | `appinsights`, `console`, `none` |" in row


def test_the_variables_report_kusto_reads_are_settings_in_the_table() -> None:
    """`report --kusto` reads its cluster and database as settings, so the generated table names them."""
    named = set(re.findall(r"`(AB_WORKER_\w+)`", configuration_page.render()))
    assert {report.QUERY_URI_VARIABLE, report.DATABASE_VARIABLE} <= named
