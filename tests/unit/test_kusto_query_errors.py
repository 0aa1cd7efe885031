"""The Kusto query adapter translates azure.core errors into ours, so the CLI never inspects SDK modules."""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

from adapters.kusto.query import query_rows
from worker.domain.errors import TransientError
from worker.domain.srm.tally import Window


class FailingClient:
    """A KustoClient stand-in whose query raises the given azure.core error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def execute_query(self, *_: Any) -> Any:
        """Raise, as the SDK does when the cluster is unreachable or the credential is refused."""
        raise self.error


@pytest.mark.parametrize("error", [ServiceRequestError("connection refused"), ClientAuthenticationError("no token")])
def test_azure_core_errors_become_transient_errors(error: Exception) -> None:
    """An unreachable cluster or refused credential is a TransientError naming the database and the SDK error."""
    client: Any = FailingClient(error)  # a KustoClient as far as query_rows reaches
    with pytest.raises(TransientError) as caught:
        list(query_rows(client, "abtests", Window()))
    assert "abtests" in str(caught.value)
    assert type(error).__name__ in str(caught.value)
