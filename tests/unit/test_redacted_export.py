"""What the App Insights log handler is handed: a redacted copy, never the live record."""

from __future__ import annotations

import logging
import sys

from adapters.telemetry import redacted_copy

SECRET = "SharedAccessKey=FAKE-KEY-42="


def test_message_extras_and_exception_are_redacted_in_the_copy_only() -> None:
    """Message args, string extras and the exception's text and stack lose the secret; the original keeps its shape."""
    try:
        raise ConnectionError(f"link failed: Endpoint=sb://ns/;{SECRET}")
    except ConnectionError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("adapters.servicebus", logging.WARNING, __file__, 1, "renew via %s", (SECRET,), exc_info)
    record.entity = f"queue;{SECRET}"

    copy = redacted_copy(record)

    assert copy.getMessage() == "renew via SharedAccessKey=***"
    assert copy.entity == "queue;SharedAccessKey=***"  # type: ignore[attr-defined]
    assert copy.exc_info is None
    attributes = vars(copy)
    assert attributes["exception.type"] == "ConnectionError"
    assert "FAKE-KEY-42" not in attributes["exception.message"]
    assert "FAKE-KEY-42" not in attributes["exception.stacktrace"]
    assert "Traceback" in attributes["exception.stacktrace"]
    assert record.args == (SECRET,)  # the console handlers still get the original (and redact it themselves)
    assert record.exc_info is exc_info
