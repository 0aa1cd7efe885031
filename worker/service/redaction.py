"""Secrets never reach logs, errors, telemetry or output: one redaction function and a log filter.

Covers Service Bus / Event Hubs connection strings (``SharedAccessKey=…``), SAS tokens
(``SharedAccessSignature sr=…&sig=…``, ``sig=`` query parameters), storage account keys
(``AccountKey=…``), App Insights instrumentation keys and bearer tokens.
"""

from __future__ import annotations

import logging
import re

REDACTED = "***"

_PATTERNS = [
    # key=value pairs inside connection strings, up to the next ';' (or quote/space/end).
    re.compile(
        r"(?i)\b(SharedAccessKey|AccountKey|InstrumentationKey|Password|ApplicationKey|AppKey|ClientSecret)"
        r"=[^;\s'\"]+"
    ),
    # SAS signatures in query strings and SharedAccessSignature tokens.
    re.compile(r"(?i)\b(sig|se|skn)=[^&\s;'\"]+"),
    re.compile(r"(?i)\b(SharedAccessSignature)\s+[^;\s'\"]+"),
    re.compile(r"(?i)\b(Bearer)\s+[A-Za-z0-9\-._~+/]+=*"),
]


def redact(text: str) -> str:
    """``text`` with every secret-looking value replaced by ``***``."""
    for pattern in _PATTERNS:
        text = pattern.sub(
            lambda m: f"{m.group(1)}={REDACTED}" if "=" in m.group(0) else f"{m.group(1)} {REDACTED}", text
        )
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message through :func:`redact` (installed on the root handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the formatted message and any exception text; always keep the record."""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(exc_text)
        return True


def install_log_redaction() -> None:
    """Attach :class:`RedactingFilter` to every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
