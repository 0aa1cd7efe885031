"""Every use of azure-kusto-data's and azure-kusto-ingest's private surface (6.0) is here, and only here.

The SDK's HTTP calls wait minutes (10 min for streaming ingestion plus 30 s slack, 1 h for the
management commands queued ingestion starts with) and take no timeout per call: the sink gives them
real connect and read timeouts by wrapping the transport of the ``requests`` session each ingest
client sends through, which only the SDK's private attributes reach. :func:`http_sessions` finds
them behind the ``transport timeouts`` guard (:data:`GUARDS`, see :mod:`adapters.sdk_guards`):
when an SDK release moved them, it logs one WARNING per process and answers no session, and each
ingestion attempt is bounded by the sink's own deadline alone (a hung request's thread then waits
out the SDK's timeout in the background).

``make lint`` keeps every other module of the product off this SDK's private surface (the
``sdk_internals`` import-linter contract); ``tests/integration/test_kusto_sdk_contract.py`` pins the
guard to the real SDK, and ``make sdk-drill`` runs it against the newest release.
"""

from __future__ import annotations

import logging

import requests

from adapters.sdk_guards import GuardSet

log = logging.getLogger(__name__)

#: The SDK release these guards were verified against (``make sdk-drill`` tries newer ones).
VERIFIED_VERSION = "6.0.4"

GUARDS = GuardSet(("azure-kusto-data", "azure-kusto-ingest"), log)

TRANSPORT_TIMEOUTS = GUARDS.add(
    "transport timeouts",
    reaches="client._kusto_client._session, client._resource_manager._kusto_client._session (requests sessions)",
    fallback=(
        "each ingestion attempt is bounded by the sink's deadline alone; an abandoned attempt's thread waits "
        "out the SDK's own timeout (minutes) before it ends"
    ),
)

#: Where each ingest client keeps the ``KustoClient`` it sends through: streaming ingestion's own,
#: and queued ingestion's resource manager's (its management commands).
_KUSTO_CLIENT_PATHS = (("_kusto_client",), ("_resource_manager", "_kusto_client"))


def http_sessions(client: object) -> list[requests.Session]:
    """The ``requests`` sessions an azure-kusto-ingest client sends its HTTP calls through; [] when the guard trips."""
    sessions = []
    for path in _KUSTO_CLIENT_PATHS:
        owner = client
        for name in path:
            owner = getattr(owner, name, None)
        session = getattr(owner, "_session", None)
        if isinstance(session, requests.Session):
            sessions.append(session)
        elif owner is not None:
            GUARDS.trip(TRANSPORT_TIMEOUTS, f"the KustoClient's _session is a {type(session).__name__}")
            return []
    if not sessions:
        GUARDS.trip(TRANSPORT_TIMEOUTS, f"no KustoClient found in a {type(client).__name__}")
    return sessions
