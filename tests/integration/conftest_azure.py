"""Fixtures for the Azure HTTP stand-ins: App Insights ingestion, Kusto, and Azurite for queued ingestion.

Servers are started once per test module on free ports of 127.0.0.1; the function-scoped fixtures
reset them (outage switches off, recorded data cleared) so tests do not see each other's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.local.standins.appinsights import AppInsightsStandIn
from adapters.local.standins.azurite import Azurite, AzuriteUnavailableError, node_available
from adapters.local.standins.kusto import KustoStandIn

__all__ = [
    "appinsights",
    "appinsights_server",
    "azurite",
    "kusto",
    "kusto_queued",
    "kusto_queued_server",
    "kusto_server",
]

KUSTO_DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kusto"


@pytest.fixture(scope="module")
def appinsights_server() -> Iterator[AppInsightsStandIn]:
    """An App Insights ingestion stand-in for the whole module."""
    server = AppInsightsStandIn().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def appinsights(appinsights_server: AppInsightsStandIn) -> Iterator[AppInsightsStandIn]:
    """The module's App Insights stand-in, healthy and empty."""
    appinsights_server.recover()
    appinsights_server.clear()
    yield appinsights_server
    appinsights_server.recover()


@pytest.fixture(scope="module")
def kusto_server() -> Iterator[KustoStandIn]:
    """A Kusto stand-in (streaming ingestion and management) with deploy/kusto's table and mapping."""
    server = KustoStandIn().start()
    for name in ("table.kql", "mapping.kql"):
        server.apply_kql(KUSTO_DEPLOY / name)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kusto(kusto_server: KustoStandIn) -> Iterator[KustoStandIn]:
    """The module's Kusto stand-in, healthy and empty."""
    kusto_server.recover()
    kusto_server.clear()
    yield kusto_server
    kusto_server.recover()


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    """Azurite on free ports (installed from npm on first use); skips when Node.js is missing."""
    if not node_available():
        pytest.skip("Node.js is not installed: queued Kusto ingestion needs Azurite")
    try:
        server = Azurite().start()
    except AzuriteUnavailableError as exc:
        pytest.skip(f"Azurite is unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kusto_queued_server(azurite: Azurite) -> Iterator[KustoStandIn]:
    """A Kusto stand-in whose ingestion resources live in Azurite, draining its ingestion queue."""
    server = KustoStandIn(azurite=azurite).start()
    for name in ("table.kql", "mapping.kql"):
        server.apply_kql(KUSTO_DEPLOY / name)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kusto_queued(kusto_queued_server: KustoStandIn) -> Iterator[KustoStandIn]:
    """The module's queued-ingestion Kusto stand-in, healthy and empty."""
    kusto_queued_server.recover()
    kusto_queued_server.clear()
    yield kusto_queued_server
    kusto_queued_server.recover()
