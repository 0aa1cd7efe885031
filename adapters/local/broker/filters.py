"""Subscription filters: correlation filters and the equality subset of SQL filters.

Supported SQL: ``1=1``/``TRUE``, and conjunctions (``AND``) of ``name = literal`` where ``name`` is an
application property (optionally ``user.name`` or ``[name]``) or a system property (``sys.Label``,
``sys.MessageId``, ...), and the literal is a quoted string or a number. Anything else (OR, NOT,
LIKE, IN, comparisons, functions) is not supported: the rule logs a warning once and matches every
message, so a subscription never silently loses messages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Protocol

from .config import RuleConfig

_LOG = logging.getLogger(__name__)

# AMQP properties-list positions of the system properties filters may name.
SYSTEM_PROPERTIES: dict[str, int] = {
    "messageid": 0,
    "to": 2,
    "label": 3,
    "subject": 3,
    "replyto": 4,
    "correlationid": 5,
    "contenttype": 6,
    "sessionid": 10,
    "replytosessionid": 12,
}

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<eq>=)"
    r"|(?P<ident>\[[^\]]+\]|[A-Za-z_][\w.\-]*))"
)


class Filterable(Protocol):
    """What a filter can see of a message."""

    @property
    def application_properties(self) -> Mapping[str, object]:
        """Application properties, keyed by name."""
        ...

    def system_property(self, index: int) -> object:
        """The AMQP properties-list field at ``index``."""
        ...


Predicate = Callable[[Filterable], bool]


def _equal(actual: object, expected: object) -> bool:
    if actual is None:
        return False
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return bool(actual == expected)
    return str(actual) == str(expected)


def _getter(name: str) -> Callable[[Filterable], object]:
    lowered = name.lower()
    if lowered.startswith("sys."):
        index = SYSTEM_PROPERTIES.get(lowered[4:])
        if index is None:
            raise ValueError(f"unknown system property {name!r}")
        return lambda m: m.system_property(index)
    if lowered.startswith("user."):
        name = name[5:]
    return lambda m: m.application_properties.get(name)


def _tokenize(text: str) -> list[tuple[str, str]] | None:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            return None
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def _is_keyword(token: tuple[str, str], word: str) -> bool:
    return token[0] == "ident" and token[1].upper() == word


def parse_sql(expression: str) -> Predicate | None:
    """Compile a supported SQL filter, or return ``None`` if it uses unsupported syntax."""
    tokens = _tokenize(expression.strip())
    if not tokens:
        return None
    if len(tokens) == 1 and _is_keyword(tokens[0], "TRUE"):
        return lambda _m: True
    # Supported grammar: clause (AND clause)*, each clause exactly three tokens "a = b".
    if len(tokens) % 4 != 3:
        return None
    clauses: list[Predicate] = []
    for i in range(0, len(tokens), 4):
        joined = i == 0 or _is_keyword(tokens[i - 1], "AND")
        clause = _clause(tokens[i], tokens[i + 2]) if tokens[i + 1][0] == "eq" else None
        if not joined or clause is None:
            return None
        clauses.append(clause)
    return lambda m: all(c(m) for c in clauses)


def _literal(token: tuple[str, str]) -> object:
    kind, text = token
    if kind == "str":
        return text[1:-1].replace("''", "'")
    return float(text) if "." in text else int(text)


def _clause(left: tuple[str, str], right: tuple[str, str]) -> Predicate | None:
    if left[0] in ("str", "num") and right[0] in ("str", "num"):
        constant = _literal(left) == _literal(right)
        return lambda _m: constant
    if left[0] in ("str", "num") and right[0] == "ident":
        left, right = right, left
    if left[0] != "ident" or right[0] not in ("str", "num"):
        return None
    name = left[1][1:-1] if left[1].startswith("[") else left[1]
    try:
        get = _getter(name)
    except ValueError:
        return None
    expected = _literal(right)
    return lambda m: _equal(get(m), expected)


def correlation_filter(spec: Mapping[str, object]) -> Predicate:
    """Compile an emulator-style ``CorrelationFilter`` object (all given fields must match)."""
    checks: list[Predicate] = []
    for key, value in spec.items():
        if key == "Properties":
            # An object, or null for none: the entities file's loader refused anything else.
            for prop, expected in (value if isinstance(value, Mapping) else {}).items():
                checks.append(_app_property_equals(str(prop), expected))
            continue
        index = SYSTEM_PROPERTIES.get(key.lower())
        if index is None:
            _LOG.warning("correlation filter field %r is not supported; ignored", key)
            continue
        if value is None:
            continue
        checks.append(_system_property_equals(index, value))
    return lambda m: all(c(m) for c in checks)


def _app_property_equals(name: str, expected: object) -> Predicate:
    return lambda m: _equal(m.application_properties.get(name), expected)


def _system_property_equals(index: int, expected: object) -> Predicate:
    return lambda m: _equal(m.system_property(index), expected)


def compile_rules(rules: tuple[RuleConfig, ...], where: str) -> Predicate | None:
    """Compile a subscription's rules; a message matches if any rule matches.

    Returns ``None`` when every message matches, so fan-out can skip evaluation entirely.
    """
    if not rules:
        return None
    predicates: list[Predicate] = []
    for rule in rules:
        if rule.correlation is not None:
            predicates.append(correlation_filter(rule.correlation))
            continue
        compiled = parse_sql(rule.sql or "1=1")
        if compiled is None:
            _LOG.warning(
                "%s rule %r: SQL filter %r is not supported by the local broker; treating it as TRUE",
                where,
                rule.name,
                rule.sql,
            )
            return None
        predicates.append(compiled)
    if len(predicates) == 1:
        return predicates[0]
    return lambda m: any(p(m) for p in predicates)
