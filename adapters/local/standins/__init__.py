"""Local stand-ins that speak Azure wire protocols on 127.0.0.1, so the real SDKs run in tests.

* :mod:`.appinsights` — the Application Insights ingestion endpoint (``POST /v2.1/track``).
* :mod:`.kusto` — Kusto streaming ingestion and the management commands queued ingestion needs,
  draining the ingestion queue of an Azurite instance.
* :mod:`.azurite` — Azurite (Microsoft's storage emulator, from npm) on free ports.

Nothing here is imported by the worker at run time; importing a module starts nothing.
"""
