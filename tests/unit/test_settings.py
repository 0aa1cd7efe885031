"""Settings are frozen; a command's flags make a new settings object, in one place."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from worker.bootstrap import environment_settings, require_servicebus
from worker.domain.errors import ConfigurationError, UsageError
from worker.service.settings import WorkerSettings


def test_settings_cannot_be_changed_in_place():
    """Assigning to a setting is refused: no code sees the settings change under it."""
    settings = WorkerSettings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.experiments_file = "other.yaml"  # type: ignore[misc]  # refused at run time too: the point


def test_flags_make_a_new_object_and_none_keeps_the_value():
    """with_overrides returns a copy with the flags given; a flag not given (None) keeps the setting."""
    settings = WorkerSettings(max_batch=100, experiments_file="a.yaml")
    flagged = settings.with_overrides(max_batch=7, experiments_file=None)
    assert (flagged.max_batch, flagged.experiments_file) == (7, "a.yaml")
    assert settings.max_batch == 100, "the original is untouched"
    secret = settings.with_overrides(servicebus_connection_string=SecretStr("Endpoint=sb://x/;SharedAccessKey=k"))
    assert "SharedAccessKey" not in repr(secret)


def test_a_flag_that_is_not_a_setting_is_refused():
    """A misspelt override name fails loudly instead of being dropped."""
    with pytest.raises(TypeError, match="max_batches"):
        WorkerSettings().with_overrides(max_batches=3)


def test_environment_settings_name_the_bad_variable(monkeypatch):
    """A bad AB_WORKER_* value is a ConfigurationError naming the variable."""
    monkeypatch.setenv("AB_WORKER_MAX_BATCH", "lots")
    with pytest.raises(ConfigurationError, match="environment variable AB_WORKER_MAX_BATCH"):
        environment_settings()


def test_no_service_bus_is_one_check_offering_the_commands_alternatives():
    """The one 'no Service Bus' check names both settings and what the command offers instead."""
    with pytest.raises(UsageError) as info:
        require_servicebus(WorkerSettings.model_construct(), ("--local for the embedded broker",))
    message = str(info.value)
    assert "AB_WORKER_SERVICEBUS_CONNECTION_STRING" in message
    assert "AB_WORKER_SERVICEBUS_NAMESPACE" in message
    assert message.endswith("or use --local for the embedded broker")
    require_servicebus(WorkerSettings.model_construct(servicebus_namespace="ns.servicebus.windows.net"))
