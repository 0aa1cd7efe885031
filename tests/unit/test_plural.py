"""Counts and their nouns agree: "1 request", "2 requests", never "1 requests" nor "request(s)"."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

from worker.domain.plural import counted

REPO = Path(__file__).parents[2]

#: Nouns the command line counts. An f-string that writes ``{n} requests`` says "1 requests" when n is 1.
COUNTED_NOUNS = (
    "requests|messages|rows|events|experiments|lines|problems|members|segments|arms|cells|variants|weights"
    "|attempts|assignments|treatments|dead letters|copies|member ids|processes"
)
#: ``{n} requests`` and ``{n} other requests`` (one word between the count and its noun).
_BARE_PLURAL = re.compile(rf"^ ([a-z]+ )?({COUNTED_NOUNS})\b")
#: Service Bus's own wording, which the embedded broker reproduces verbatim (max delivery count > 1 in practice).
VERBATIM = frozenset({"adapters/local/broker/entities.py: {...} delivery attempts."})


@pytest.mark.parametrize(
    ("n", "noun", "plural", "expected"),
    [
        (0, "request", None, "0 requests"),
        (1, "request", None, "1 request"),
        (2, "request", None, "2 requests"),
        (1, "copy", "copies", "1 copy"),
        (3, "copy", "copies", "3 copies"),
        (1, "dead letter", None, "1 dead letter"),
    ],
)
def test_counted_agrees(n: int, noun: str, plural: str | None, expected: str) -> None:
    """The noun is singular for exactly one."""
    assert counted(n, noun, plural) == expected


def test_counted_groups_thousands_when_asked() -> None:
    """Tables write 1,234; log lines keep the bare number."""
    assert counted(1234, "row", thousands=True) == "1,234 rows"
    assert counted(1234, "row") == "1234 rows"


def _f_string_problems(path: Path) -> list[str]:
    """``{n} requests`` and ``request(s)`` in the f-strings of ``path``, as ``file:line: text``."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.JoinedStr):
            continue
        parts = node.values
        for before, after in itertools.pairwise(parts):
            text = after.value if isinstance(after, ast.Constant) and isinstance(after.value, str) else ""
            if isinstance(before, ast.FormattedValue) and _BARE_PLURAL.match(text):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {{...}}{text.split(',')[0]}")
        for part in parts:
            if isinstance(part, ast.Constant) and isinstance(part.value, str) and "(s)" in part.value:
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {part.value.strip()}")
    return problems


def _unnumbered(problem: str) -> str:
    return re.sub(r":\d+:", ":", problem, count=1)


def test_no_message_counts_with_a_fixed_plural() -> None:
    """Every message of the worker and its adapters that counts something says it with counted()."""
    sources = [*sorted((REPO / "worker").rglob("*.py")), *sorted((REPO / "adapters").rglob("*.py"))]
    problems = [
        problem for path in sources for problem in _f_string_problems(path) if _unnumbered(problem) not in VERBATIM
    ]
    assert problems == []
