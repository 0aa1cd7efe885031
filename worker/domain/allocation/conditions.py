"""Targeting conditions (``docs/allocation.md`` §2.5): compiled once at load, evaluated per request.

:func:`compile_condition` checks a condition from the experiments file and turns it into nested
closures; it reports every problem (unknown operators, operands of a kind that cannot compare,
malformed versions and times, patterns) with the path of the key. Evaluation takes the request's
context and segment and only ever answers match or no match: a missing attribute, a value of the
wrong kind, NaN, a 4,000-digit integer, a nested object or a 1,024-character string all simply do
not match (only ``$exists: false`` matches a missing attribute).
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from schemas.instants import format_instant, instant_of, instant_problem, parse_instant
from schemas.models import MAX_CONDITION_DEPTH, MAX_CONTEXT_STRING_CHARS, MAX_VERSION_CHARS
from schemas.text import surrogate_problem
from worker.domain.allocation.versions import version_key

#: A compiled condition or clause: ``(context, segment) -> matches``. Never raises.
Predicate = Callable[[object, "str | None"], bool]
#: A compiled test of one attribute's value (``None`` when missing). Never raises.
Test = Callable[[object], bool]
#: ``operator.gt`` and its kin, applied to two values of one kind (typeshed types them over comparison protocols).
Compare = Callable[[Any, Any], Any]
#: An equality operand, checked: its kind and its value as compared (a number as a double).
Operand = tuple[Literal["string"], str] | tuple[Literal["number"], float] | tuple[Literal["boolean"], bool]

EQUALITY = ("$eq", "$ne", "$in", "$nin")
ORDERING = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
VERSIONS = {"$veq": operator.eq, "$vgt": operator.gt, "$vgte": operator.ge, "$vlt": operator.lt, "$vlte": operator.le}
OPERATORS = frozenset({*EQUALITY, *ORDERING, "$exists", *VERSIONS})
COMBINATORS = frozenset({"$and", "$or", "$not"})
#: Refused by name, with the reason: a pattern in a configuration is a denial of service waiting for its input.
PATTERN_OPERATORS = frozenset({"$regex", "$regexp", "$regexMatch", "$match", "$like", "$pattern", "$glob"})
SEGMENT = "segment"


@dataclass(frozen=True, slots=True)
class ConditionProblem:
    """One thing wrong with a condition: where (``targeting.country.$in.2``) and what."""

    path: str
    message: str


@dataclass(frozen=True, slots=True)
class Clause:
    """One top-level key of a condition, kept apart so an explanation can say which one failed."""

    label: str
    attribute: str | None
    matches: Predicate


@dataclass(frozen=True, slots=True)
class CompiledCondition:
    """A checked condition: its clauses, the whole as one predicate, and its canonical form (§2.8)."""

    clauses: tuple[Clause, ...]
    matches: Predicate
    canonical: dict[str, object]


def attribute_value(context: object, segment: str | None, name: str) -> object:
    """The value a condition sees for ``name``: the segment for ``segment``, else the context's
    top-level key; ``None`` when missing (JSON null is missing too). Never raises."""
    if name == SEGMENT:
        return segment
    if type(context) is dict:
        return context.get(name)
    if isinstance(context, Mapping):
        try:
            return context.get(name)
        except Exception:  # a hostile mapping is no context
            return None
    return None


def kind_of(value: object) -> str:
    """The contract's kind of an attribute value, for explanations (never the value itself)."""
    if value is None or isinstance(value, str) or value is True or value is False:
        return {type(None): "missing", bool: "boolean"}.get(type(value), "string")
    if _number(value) is not None:
        return "number"
    if isinstance(value, list | tuple):
        return "array"
    return "object" if isinstance(value, Mapping) else "other"


def _number(value: object) -> float | None:
    """A value as the double a JSON parser reads, or ``None`` when it is not a number (booleans, NaN)."""
    if type(value) is float:
        return None if math.isnan(value) else value
    if type(value) is bool or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the double range: the infinity a JSON parser would read
        return math.inf if value > 0 else -math.inf
    except Exception:  # a hostile subclass
        return None
    return None if math.isnan(number) else number


def compile_condition(raw: object, path: str = "targeting") -> tuple[CompiledCondition | None, list[ConditionProblem]]:
    """Check and compile a condition; the compiled form is ``None`` whenever there is any problem."""
    compiler = _Compiler()
    compiled = compiler.condition(raw, path, 0)
    if compiler.problems or compiled is None:
        return None, compiler.problems
    clauses, canonical = compiled
    return CompiledCondition(tuple(clauses), _all([clause.matches for clause in clauses]), canonical), []


def operand_kinds(condition: CompiledCondition) -> dict[str, frozenset[str]]:
    """Per attribute, the kinds of value the condition compares it with: ``string``, ``number``, ``boolean``.

    Read from the canonical form, at any depth. ``$exists`` compares no value and adds no kind;
    version and time operands are strings. Untyped sources (a CSV's cells) use it to read a cell as
    the kind its targeting expects (:func:`worker.service.batch.csv_context`).
    """
    kinds: dict[str, set[str]] = {}

    def visit(node: Any) -> None:  # Any: the canonical form, well-formed by construction (the compiler built it)
        for key, value in node.items():
            if key in ("$and", "$or"):
                for item in value:
                    visit(item)
            elif key == "$not":
                visit(value)
            else:
                found = kinds.setdefault(key, set())
                operands = value.items() if isinstance(value, dict) else [("$eq", value)]
                for op, operand in operands:
                    if op != "$exists":
                        found.update(_kind_name(item) for item in (operand if isinstance(operand, list) else [operand]))

    visit(condition.canonical)
    return {name: frozenset(found) for name, found in kinds.items()}


def _kind_name(operand: object) -> str:
    if isinstance(operand, bool):
        return "boolean"
    return "number" if isinstance(operand, int | float) else "string"


class _Compiler:
    def __init__(self) -> None:
        self.problems: list[ConditionProblem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(ConditionProblem(path, message))

    def condition(self, raw: object, path: str, depth: int) -> tuple[list[Clause], dict[str, object]] | None:
        if not isinstance(raw, dict):
            self.problem(path, f"must be a mapping of attribute names to conditions, got {_kind(raw)}")
            return None
        clauses: list[Clause] = []
        canonical: dict[str, object] = {}
        for key, value in raw.items():
            where = f"{path}.{key}"
            if not isinstance(key, str):
                self.problem(
                    f"{path}.{key!r}",
                    "attribute names are strings (YAML reads unquoted yes/no/on/off and numbers as other "
                    "types: quote the key)",
                )
                continue
            if key in COMBINATORS:
                compiled = self.combinator(key, value, where, depth)
            elif key.startswith("$"):
                self.problem(where, self.misplaced_operator(key))
                continue
            else:
                compiled = self.attribute(key, value, where)
            if compiled is not None:
                clause, canonical[key] = compiled
                clauses.append(clause)
        return clauses, canonical

    def misplaced_operator(self, key: str) -> str:
        if key in PATTERN_OPERATORS:
            return _PATTERN_REFUSAL
        if key in OPERATORS:
            return f"{key} compares an attribute: write it inside one, e.g. {{country: {{{key}: ...}}}}"
        return f"unknown combinator {key}; conditions combine with $and, $or and $not"

    def combinator(self, key: str, value: object, path: str, depth: int) -> tuple[Clause, object] | None:
        if depth + 1 > MAX_CONDITION_DEPTH:
            self.problem(path, f"conditions nest at most {MAX_CONDITION_DEPTH} deep")
            return None
        if key == "$not":
            inner = self.condition(value, path, depth + 1)
            if inner is None:
                return None
            negated = _all([clause.matches for clause in inner[0]])
            return Clause(_label(key, inner[1]), None, lambda context, segment: not negated(context, segment)), inner[1]
        if not isinstance(value, list) or not value:
            self.problem(path, f"{key} takes a non-empty list of conditions, got {_kind(value)}")
            return None
        parts = [self.condition(item, f"{path}.{index}", depth + 1) for index, item in enumerate(value)]
        if any(part is None for part in parts):
            return None
        predicates = [_all([clause.matches for clause in part[0]]) for part in parts if part is not None]
        canonical = [part[1] for part in parts if part is not None]
        combined = _all(predicates) if key == "$and" else _any(predicates)
        return Clause(_label(key, canonical), None, combined), canonical

    def attribute(self, name: str, value: object, path: str) -> tuple[Clause, object] | None:
        if not 0 < len(name) <= MAX_CONTEXT_STRING_CHARS:
            self.problem(path[:80], f"attribute names are 1 to {MAX_CONTEXT_STRING_CHARS} characters")
            return None
        if surrogate_problem(name):
            self.problem(path, f"attribute name {surrogate_problem(name)}")
            return None
        compiled_tests: tuple[list[Test], object] | None
        if isinstance(value, dict):
            compiled_tests = self.operators(value, path)
        else:
            equal = self.equality_operand(value, path, plain=True)
            compiled_tests = None if equal is None else ([_equals(*equal)], equal[1])
        if compiled_tests is None:
            return None
        tests, canonical = compiled_tests
        return Clause(_label(name, canonical), name, _attribute_clause(name, tests)), canonical

    def operators(self, raw: dict[object, object], path: str) -> tuple[list[Test], dict[str, object]] | None:
        if not raw:
            self.problem(path, "an empty operator mapping compares nothing: write a value or operators")
            return None
        tests: list[Test] = []
        canonical: dict[str, object] = {}
        ok = True
        for op, operand in raw.items():
            where = f"{path}.{op}"
            compiled = self.operator(op, operand, where)
            if compiled is None:
                ok = False
                continue
            tests.append(compiled[0])
            canonical[str(op)] = compiled[1]  # compiled: op is one of OPERATORS
        return (tests, canonical) if ok else None

    def operator(self, op: object, operand: object, path: str) -> tuple[Test, object] | None:
        if op in ("$eq", "$ne"):
            equal = self.equality_operand(operand, path)
            return None if equal is None else ((_equals if op == "$eq" else _differs)(*equal), equal[1])
        if op in ("$in", "$nin"):
            return self.membership(op, operand, path)
        if op in ORDERING:
            return self.ordering(ORDERING[op], operand, path)
        if op in VERSIONS:
            return self.version(VERSIONS[op], operand, path)
        if op == "$exists" and (operand is True or operand is False):
            return (_present if operand else _missing), operand
        self.problem(path, self.refused_operator(op, operand))
        return None

    def refused_operator(self, op: object, operand: object) -> str:
        if not isinstance(op, str) or not op.startswith("$"):
            return "a mapping of operators must hold operators only ($eq, $in, $gt, ...), not other keys"
        if op == "$exists":
            return f"$exists takes true or false, got {_kind(operand)}"
        if op == "$not":
            return "$not wraps a condition: write $not: {country: US}, not country: {$not: ...}"
        if op in PATTERN_OPERATORS:
            return _PATTERN_REFUSAL
        return f"unknown operator {op!r:.40}; the operators are {', '.join(sorted(OPERATORS))}"

    def equality_operand(self, operand: object, path: str, plain: bool = False) -> Operand | None:
        """``(kind, value)`` of an equality operand: a string, a finite number (as a double) or a boolean."""
        if operand is True or operand is False:
            return "boolean", operand
        if isinstance(operand, str):
            return self.text_operand(operand, path)
        if isinstance(operand, int | float):
            number = _finite(operand)
            if number is None:
                self.problem(path, f"must be a finite number, got {operand!r:.40}")
                return None
            return "number", number
        if operand is None:
            self.problem(path, "null never matches (a null attribute is a missing one): write {$exists: false}")
        elif isinstance(operand, datetime | date):
            self.problem(path, "equality compares text: quote the time, or compare it with $gt/$gte/$lt/$lte")
        elif isinstance(operand, list) and plain:
            self.problem(path, "a list is not a value: write {$in: [...]}")
        else:
            self.problem(path, f"must be a string, a number or a boolean, got {_kind(operand)}")
        return None

    def text_operand(self, operand: str, path: str) -> tuple[Literal["string"], str] | None:
        if len(operand) > MAX_CONTEXT_STRING_CHARS:
            self.problem(path, f"is over {MAX_CONTEXT_STRING_CHARS} characters: no context string can match it")
            return None
        problem = surrogate_problem(operand)
        if problem:
            self.problem(path, problem)
            return None
        return "string", operand

    def membership(self, op: str, operand: object, path: str) -> tuple[Test, object] | None:
        if not isinstance(operand, list) or not operand:
            self.problem(path, f"{op} takes a non-empty list of strings, numbers or booleans, got {_kind(operand)}")
            return None
        elements = [self.equality_operand(item, f"{path}.{index}") for index, item in enumerate(operand)]
        if any(element is None for element in elements):
            return None
        strings: set[str] = set()
        numbers: set[float] = set()
        booleans: set[bool] = set()
        for element in elements:
            match element:
                case ("string", str() as text):
                    strings.add(text)
                case ("boolean", bool() as flag):
                    booleans.add(flag)
                case ("number", number):
                    numbers.add(number)
        canonical = [value for _, value in (element for element in elements if element is not None)]
        make = _member if op == "$in" else _not_member
        return make(frozenset(strings), frozenset(numbers), frozenset(booleans)), canonical

    def ordering(self, compare: Compare, operand: object, path: str) -> tuple[Test, object] | None:
        if operand is not True and operand is not False and isinstance(operand, int | float):
            number = _finite(operand)
            if number is None:
                self.problem(path, f"must be a finite number, got {operand!r:.40}")
                return None
            return _number_order(compare, number), number
        if isinstance(operand, str | datetime | date):
            problem = instant_problem(operand)
            micros = instant_of(operand)
            if problem or micros is None:
                hint = " (to compare versions use $vgt, $vgte, $vlt, $vlte)" if isinstance(operand, str) else ""
                self.problem(path, f"takes a number or a time; {operand!r:.60} {problem}{hint}")
                return None
            return _time_order(compare, micros), format_instant(micros)
        self.problem(path, f"takes a number or a time such as 2026-12-01T00:00:00Z, got {_kind(operand)}")
        return None

    def version(self, compare: Compare, operand: object, path: str) -> tuple[Test, object] | None:
        key = version_key(operand) if isinstance(operand, str) else None
        if key is None:
            self.problem(
                path,
                f"{operand!r:.60} is not a semantic version (1.2.3, 1.2, 1.2.3-rc.1; no v prefix, no leading zeros, "
                f"at most three numbers, at most {MAX_VERSION_CHARS} characters)",
            )
            return None
        return _version_order(compare, key), operand


_PATTERN_REFUSAL = (
    "regular expressions and patterns are not supported (a pattern in a configuration is a denial of service "
    "waiting for its input): use $eq, $in or a dedicated context attribute"
)


def _finite(value: int | float) -> float | None:
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _kind(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", str: "a string", list: "a list", dict: "a mapping"}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), f"a {type(value).__name__}")


def _label(name: str, canonical: object) -> str:
    text = json.dumps({name: canonical}, ensure_ascii=False, separators=(", ", ": "))[1:-1]
    return text if len(text) <= 200 else text[:199] + "…"


# --- tests of one value (compiled operands bound in closures) ------------------------------------


def _equals(kind: str, expected: object) -> Test:
    if kind == "string":
        return lambda value: isinstance(value, str) and value == expected
    if kind == "number":
        return lambda value: _number(value) == expected
    return lambda value: value is expected


def _differs(kind: str, expected: object) -> Test:
    if kind == "string":
        return lambda value: isinstance(value, str) and value != expected
    if kind == "number":

        def differs(value: object) -> bool:
            number = _number(value)
            return number is not None and number != expected

        return differs
    return lambda value: (value is True or value is False) and value is not expected


def _member(strings: frozenset[str], numbers: frozenset[float], booleans: frozenset[bool]) -> Test:
    def member(value: object) -> bool:
        if isinstance(value, str):
            return value in strings
        if value is True or value is False:
            return value in booleans
        number = _number(value)
        return number is not None and number in numbers

    return member


def _not_member(strings: frozenset[str], numbers: frozenset[float], booleans: frozenset[bool]) -> Test:
    def not_member(value: object) -> bool:
        if isinstance(value, str):
            return bool(strings) and value not in strings
        if value is True or value is False:
            return bool(booleans) and value not in booleans
        number = _number(value)
        return number is not None and bool(numbers) and number not in numbers

    return not_member


def _number_order(compare: Compare, bound: float) -> Test:
    def test(value: object) -> bool:
        number = _number(value)
        return number is not None and compare(number, bound)

    return test


def _time_order(compare: Compare, bound: int) -> Test:
    def test(value: object) -> bool:
        if not isinstance(value, str):
            return False
        micros = parse_instant(value)
        return micros is not None and compare(micros, bound)

    return test


def _version_order(compare: Compare, bound: tuple[object, ...]) -> Test:
    def test(value: object) -> bool:
        if not isinstance(value, str) or len(value) > MAX_VERSION_CHARS:
            return False
        key = version_key(value)
        return key is not None and compare(key, bound)

    return test


def _present(value: object) -> bool:
    return value is not None


def _missing(value: object) -> bool:
    return value is None


# --- predicates over (context, segment) ----------------------------------------------------------


def _attribute_clause(name: str, tests: list[Test]) -> Predicate:
    test = tests[0] if len(tests) == 1 else _every(tests)
    if name == SEGMENT:
        return lambda context, segment: test(segment)

    def clause(context: object, segment: str | None) -> bool:
        return test(context.get(name) if type(context) is dict else attribute_value(context, segment, name))

    return clause


def _every(tests: list[Test]) -> Test:
    def every(value: object) -> bool:
        for test in tests:  # noqa: SIM110 - a loop beats all() over a generator on the hot path
            if not test(value):
                return False
        return True

    return every


def _all(predicates: list[Predicate]) -> Predicate:
    if not predicates:
        return lambda context, segment: True
    if len(predicates) == 1:
        return predicates[0]

    def every(context: object, segment: str | None) -> bool:
        for predicate in predicates:  # noqa: SIM110 - as above
            if not predicate(context, segment):
                return False
        return True

    return every


def _any(predicates: list[Predicate]) -> Predicate:
    def some(context: object, segment: str | None) -> bool:
        for predicate in predicates:  # noqa: SIM110 - as above
            if predicate(context, segment):
                return True
        return False

    return some
