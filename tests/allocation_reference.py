"""A plain restatement of the allocation contract (``docs/allocation.md``), for the conformance file.

Deliberately naive and independent of ``worker.domain.allocation``: it reads the configuration as
plain JSON (no models, no compilation), hashes with ``hashlib`` and ``hexdigest``, compares floats
exactly as the page states, interprets conditions recursively on every call, parses versions with
a regular expression and ``int``, times with ``datetime.fromisoformat``, and serialises the digest
with its own JCS. It generates ``schemas/allocation-cases.json``; the tests hold the worker's
optimised code to that file. Never optimise it, and never import the worker's allocation code here.
"""

# A restatement reads top to bottom with one return per rule of the page, as the page states them.
# ruff: noqa: PLR0911

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
REASONS_OUT_OF_EXPERIMENT = ("override", "draft", "stopped", "launched", "not_started", "ended")


# --- §2.1 hashing -----------------------------------------------------------------------------------


def h(text: str) -> float:
    """``H(s)`` exactly as the seed rule computes it."""
    return (int(hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()[:8], 16) % 1_000_000) / 1_000_000


def h_int(text: str) -> int:
    """``h_int``: the integer before the division."""
    return int(hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()[:8], 16) % 1_000_000


def seed_rule(seed: str, experiment_id: str, user_id: str, split: dict[str, float]) -> tuple[str, float, list[float]]:
    """The seed's ``assign_user``: (variant, hash, [lower, upper])."""
    value = h(f"{seed}:{experiment_id}:{user_id}")
    ranges = {}
    total = 0.0
    for variant in sorted(split):
        ranges[variant] = (total, total + split[variant])
        total += split[variant]
    chosen = sorted(split)[-1]
    for variant in sorted(split):
        if ranges[variant][0] <= value < ranges[variant][1]:
            chosen = variant
            break
    return chosen, value, list(ranges[chosen])


# --- §2.6 times -------------------------------------------------------------------------------------

TIME = re.compile(r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$", re.ASCII)


def time_micros(value: Any) -> int | None:
    """Microseconds since the epoch of a time string (or aware datetime), floored; ``None`` if not a time."""
    if isinstance(value, datetime):
        return None if value.tzinfo is None else (value - EPOCH) // timedelta(microseconds=1)
    if not isinstance(value, str) or "\n" in value or not TIME.match(value):
        return None
    text = value.upper().replace("Z", "+00:00")
    # fromisoformat (3.11) keeps at most six fraction digits itself, but say so explicitly: floor to µs.
    match = re.search(r"\.(\d+)", text)
    if match:
        text = text.replace(match.group(0), "." + (match.group(1) + "000000")[:6])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment - EPOCH) // timedelta(microseconds=1)


def time_text(micros: int) -> str:
    """The canonical time form of §2.8."""
    moment = EPOCH + timedelta(microseconds=micros)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- §2.7 versions ----------------------------------------------------------------------------------

VERSION = re.compile(
    r"^(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
    re.ASCII,
)


def parse_version(text: Any) -> tuple[list[int], list[str]] | None:
    """(core numbers padded to three, pre-release identifiers) or ``None``."""
    if not isinstance(text, str) or len(text) > 256 or "\n" in text:
        return None
    match = VERSION.match(text)
    if not match:
        return None
    core = [int(match.group(i) or 0) for i in (1, 2, 3)]
    return core, (match.group(4).split(".") if match.group(4) else [])


def compare_versions(left: Any, right: Any) -> int:
    """SemVer 2.0.0 precedence, written out rule by rule."""
    a, b = parse_version(left), parse_version(right)
    assert a is not None
    assert b is not None
    if a[0] != b[0]:
        return -1 if a[0] < b[0] else 1
    pre_a, pre_b = a[1], b[1]
    if not pre_a and not pre_b:
        return 0
    if not pre_a:
        return 1
    if not pre_b:
        return -1
    for x, y in zip(pre_a, pre_b, strict=False):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1
        if x.isdigit():
            return -1
        if y.isdigit():
            return 1
        return -1 if x < y else 1
    if len(pre_a) == len(pre_b):
        return 0
    return -1 if len(pre_a) < len(pre_b) else 1


# --- §2.5 conditions --------------------------------------------------------------------------------


def kind(value: Any) -> str:
    """string, number, boolean or other (NaN is not a number; booleans are not numbers)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float):
        return "other" if isinstance(value, float) and math.isnan(value) else "number"
    return "other"


def as_double(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def attribute(context: Any, segment: str | None, name: str) -> Any:
    if name == "segment":
        return segment
    if isinstance(context, dict):
        return context.get(name)
    return None


def condition_matches(condition: dict[str, Any], context: Any, segment: str | None) -> bool:
    """Every key must match."""
    for key, value in condition.items():
        if key == "$and":
            ok = all(condition_matches(item, context, segment) for item in value)
        elif key == "$or":
            ok = any(condition_matches(item, context, segment) for item in value)
        elif key == "$not":
            ok = not condition_matches(value, context, segment)
        elif isinstance(value, dict):
            actual = attribute(context, segment, key)
            ok = all(operator_matches(actual, op, operand) for op, operand in value.items())
        else:
            ok = operator_matches(attribute(context, segment, key), "$eq", value)
        if not ok:
            return False
    return True


def operator_matches(actual: Any, op: str, operand: Any) -> bool:
    """One operator against one attribute value (``None``: missing)."""
    if op == "$exists":
        return (actual is not None) == operand
    if actual is None:
        return False
    if op in ("$eq", "$ne", "$in", "$nin"):
        elements = operand if op in ("$in", "$nin") else [operand]
        comparable = [element for element in elements if kind(element) == kind(actual)]
        if not comparable:
            return False
        if kind(actual) == "number":
            equal = any(as_double(actual) == as_double(element) for element in comparable)
        else:
            equal = any(actual == element for element in comparable)
        return equal if op in ("$eq", "$in") else not equal
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if kind(operand) == "number":
            if kind(actual) != "number":
                return False
            left, right = as_double(actual), as_double(operand)
        else:
            if not isinstance(actual, str):
                return False
            micros, bound = time_micros(actual), time_micros(operand)
            if micros is None or bound is None:  # an operand the compiler refused never gets here
                return False
            left, right = micros, bound
        return {"$gt": left > right, "$gte": left >= right, "$lt": left < right, "$lte": left <= right}[op]
    if op in ("$veq", "$vgt", "$vgte", "$vlt", "$vlte"):
        if parse_version(actual) is None:
            return False
        order = compare_versions(actual, operand)
        return {"$veq": order == 0, "$vgt": order > 0, "$vgte": order >= 0, "$vlt": order < 0, "$vlte": order <= 0}[op]
    raise AssertionError(f"not an operator: {op}")


# --- §2.3 the decision ------------------------------------------------------------------------------


def control_of(experiment: dict[str, Any]) -> str:
    if experiment.get("control") is not None:
        return str(experiment["control"])
    return "control" if "control" in experiment["split"] else sorted(experiment["split"])[0]


def decide(
    document: dict[str, Any], experiment_id: str, user_id: str, segment: str | None, context: Any, at: str
) -> dict[str, Any]:
    """The decision walk of §2.3, top to bottom; ``at`` is a time string."""
    experiment = next(e for e in document["experiments"] if e["id"] == experiment_id)
    seed = experiment.get("seed", "echovoice")
    status = experiment.get("status", "running")
    control = control_of(experiment)
    now = time_micros(at)
    assert now is not None, "the decision time is an aware datetime"

    def out(variant: str, reason: str) -> dict[str, Any]:
        return {"variant_id": variant, "in_experiment": False, "reason": reason, "hash_value": None, "threshold": None}

    overrides = experiment.get("overrides", {})
    if status in ("draft", "running") and user_id in overrides:
        return out(overrides[user_id], "override")
    if status == "draft":
        return out(control, "draft")
    if status == "stopped":
        return out(control, "stopped")
    if status == "launched":
        return out(experiment["launched"], "launched")
    start, end = time_micros(experiment.get("start_at")), time_micros(experiment.get("end_at"))
    if start is not None and now < start:
        return out(control, "not_started")
    if end is not None and now >= end:
        return out(control, "ended")
    if experiment.get("targeting") and not condition_matches(experiment["targeting"], context, segment):
        return out(control, "targeting")
    holdouts = {holdout["id"]: holdout for holdout in document.get("holdouts", [])}
    for holdout_id in experiment.get("holdouts", []):
        holdout = holdouts[holdout_id]
        if h(f"holdout:{holdout.get('salt') or holdout['id']}:{user_id}") < holdout["share"]:
            return out(control, "holdout")
    if experiment.get("layer"):
        layer = next(layer for layer in document["layers"] if layer["id"] == experiment["layer"]["id"])
        lo, hi = experiment["layer"]["range"]
        if not lo <= h(f"layer:{layer.get('salt') or layer['id']}:{user_id}") < hi:
            return out(control, "layer")
    if not h(f"coverage:{seed}:{experiment_id}:{user_id}") < experiment.get("coverage", 1):
        return out(control, "coverage")
    split = experiment.get("segments", {}).get(segment, experiment["split"]) if segment else experiment["split"]
    variant, value, threshold = seed_rule(seed, experiment_id, user_id, split)
    return {
        "variant_id": variant,
        "in_experiment": True,
        "reason": "bucketed",
        "hash_value": value,
        "threshold": threshold,
    }


def hashes(document: dict[str, Any], experiment_id: str, user_id: str) -> dict[str, dict[str, Any]]:
    """Every hash the experiment defines, reached or not: input string, value and integer."""
    experiment = next(e for e in document["experiments"] if e["id"] == experiment_id)
    seed = experiment.get("seed", "echovoice")
    inputs = {"variant": f"{seed}:{experiment_id}:{user_id}", "coverage": f"coverage:{seed}:{experiment_id}:{user_id}"}
    if experiment.get("layer"):
        layer = next(layer for layer in document["layers"] if layer["id"] == experiment["layer"]["id"])
        inputs["layer"] = f"layer:{layer.get('salt') or layer['id']}:{user_id}"
    for holdout in document.get("holdouts", []):
        if holdout["id"] in experiment.get("holdouts", []):
            inputs[f"holdout:{holdout['id']}"] = f"holdout:{holdout.get('salt') or holdout['id']}:{user_id}"
    return {name: {"input": text, "value": h(text), "int": h_int(text)} for name, text in inputs.items()}


# --- §2.8 config_version ----------------------------------------------------------------------------


def jcs_number(value: float) -> str:
    """ECMAScript Number::toString, from the shortest round-trip digits (written out from the spec)."""
    if value == 0:
        return "0"
    if value < 0:
        return "-" + jcs_number(-value)
    _, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    k = len(digits)
    n = k + int(exponent)
    text = "".join(map(str, digits))
    if k <= n <= 21:
        return text + "0" * (n - k)
    if 0 < n <= 21:
        return text[:n] + "." + text[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + text
    e = n - 1
    return text[0] + ("." + text[1:] if k > 1 else "") + "e" + ("+" if e > 0 else "-") + str(abs(e))


def jcs(value: Any) -> str:
    """RFC 8785, for the values ``D`` holds."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return jcs_number(float(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(jcs(item) for item in value) + "]"
    keys = sorted(value, key=lambda key: list(key.encode("utf-16-be")))
    return "{" + ",".join(json.dumps(key, ensure_ascii=False) + ":" + jcs(value[key]) for key in keys) + "}"


def canonical_condition(condition: Any, op: str | None = None) -> Any:
    """The condition as written, numbers as doubles, time operands of ordering operators in UTC form."""
    if isinstance(condition, dict):
        return {key: canonical_condition(value, key) for key, value in condition.items()}
    if isinstance(condition, list):
        return [canonical_condition(item, op) for item in condition]
    if op in ("$gt", "$gte", "$lt", "$lte") and isinstance(condition, str):
        micros = time_micros(condition)
        assert micros is not None
        return time_text(micros)
    if isinstance(condition, int | float) and not isinstance(condition, bool):
        return float(condition)
    return condition


def config_version(document: dict[str, Any], experiment_id: str) -> str:
    """``sha256(JCS(D)).hexdigest()[:16]``."""
    e = next(x for x in document["experiments"] if x["id"] == experiment_id)
    layer = None
    if e.get("layer"):
        declared = next(layer for layer in document["layers"] if layer["id"] == e["layer"]["id"])
        layer = {
            "id": declared["id"],
            "salt": declared.get("salt") or declared["id"],
            "range": list(e["layer"]["range"]),
        }
    holdouts = sorted(
        (
            {"id": x["id"], "salt": x.get("salt") or x["id"], "share": x["share"]}
            for x in document.get("holdouts", [])
            if x["id"] in e.get("holdouts", [])
        ),
        key=lambda x: x["id"],
    )
    start, end = e.get("start_at"), e.get("end_at")
    d = {
        "contract": "allocation/1",
        "experiment_id": e["id"],
        "seed": e.get("seed", "echovoice"),
        "split": e["split"],
        "segments": e.get("segments", {}),
        "control": control_of(e),
        "status": e.get("status", "running"),
        "launched": e.get("launched"),
        "start_at": None if start is None else time_text(time_micros(start) or 0),
        "end_at": None if end is None else time_text(time_micros(end) or 0),
        "coverage": e.get("coverage", 1),
        "layer": layer,
        "holdouts": holdouts,
        "targeting": canonical_condition(e["targeting"]) if e.get("targeting") else None,
        "overrides": e.get("overrides", {}),
    }
    return hashlib.sha256(jcs(d).encode("utf-8")).hexdigest()[:16]
