"""Fixtures for the Azure HTTP stand-ins: App Insights ingestion, Kusto, and Azurite for queued ingestion.

Servers are started once per test module on free ports of 127.0.0.1; the function-scoped fixtures
reset them (outage switches off, recorded data cleared) so tests do not see each other's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

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
]

KUSTO_DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kusto"


_StandIn = TypeVar("_StandIn", AppInsightsStandIn, KustoStandIn)


def _healthy_and_empty(server: _StandIn) -> Iterator[_StandIn]:
    """A module-scoped stand-in reset for one test: recovered from any fault, emptied; recovered after."""
    server.recover()
    server.clear()
    yield server
    server.recover()


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
    yield from _healthy_and_empty(appinsights_server)


@pytest.fixture
def kusto() -> Iterator[KustoStandIn]:
    """A Kusto stand-in (streaming ingestion and management) with deploy/kusto's table and mapping.

    One per test, not per module: a sink abandoned by an earlier test (an attempt thread still waiting
    out a hang) could otherwise ingest its rows into the next test's stand-in. It starts in milliseconds.
    """
    server = KustoStandIn().start()
    for name in ("table.kql", "mapping.kql"):
        server.apply_kql(KUSTO_DEPLOY / name)
    try:
        yield server
    finally:
        server.stop()


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
    yield from _healthy_and_empty(kusto_queued_server)
