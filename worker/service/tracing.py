"""W3C trace context read from a request's application properties.

Publishers put ``traceparent`` (and ``tracestate``) in the request's application properties; the
older Azure SDKs write ``Diagnostic-Id`` with the same format. The worker continues that trace.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


class _PropertiesGetter(Getter[Mapping[str, object]]):
    def get(self, carrier: Mapping[str, object], key: str) -> list[str] | None:
        value = _text(carrier.get(key))
        if value is None and key == "traceparent":
            value = _text(carrier.get("Diagnostic-Id"))
        return [value] if value else None

    def keys(self, carrier: Mapping[str, object]) -> list[str]:
        return [str(k) for k in carrier]


def extract_context(properties: Mapping[str, object] | None) -> Context | None:
    """The publisher's trace context from application properties, or None when there is none."""
    if not properties:
        return None
    if "traceparent" not in properties and "Diagnostic-Id" not in properties:
        return None
    return _PROPAGATOR.extract(properties, getter=_PropertiesGetter())
