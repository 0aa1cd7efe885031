"""Hypothesis strategies for the bodies a published JSON Schema accepts.

hypothesis-jsonschema would do this, but its newest release (0.23.1) calls Hypothesis internals that
the pinned Hypothesis no longer has (``many.more``), so it fails on its first draw. This covers the
keywords the wire contract's schemas use, lean towards each limit's edge, and refuses any keyword it
does not know, so a new limit in a schema cannot go ungenerated unnoticed. Every drawn value is
checked against the whole schema with ``jsonschema``.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import strategies as st
from jsonschema import Draft202012Validator

#: Keywords that only annotate (never constrain) and those this module generates for.
ANNOTATIONS = {"$comment", "$id", "$schema", "$defs", "title", "description", "default", "examples"}
HANDLED = {"$ref", "anyOf", "type", "not", "pattern", "minLength", "maxLength", "properties", "required"}
HANDLED |= {"additionalProperties", "propertyNames", "maxProperties", "items"}
#: Extra top-level fields a tolerant reader must ignore.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that ``schema`` (a Draft 2020-12 document) accepts."""
    validator = Draft202012Validator(schema)
    return _strategy(schema, schema).filter(validator.is_valid)


def _strategy(node: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    unknown = set(node) - ANNOTATIONS - HANDLED
    if unknown:
        raise NotImplementedError(f"no generator for JSON Schema keywords {sorted(unknown)}")
    if "$ref" in node:
        return _strategy(_resolve(node["$ref"], root), root)
    if "anyOf" in node:
        return st.one_of([_strategy(option, root) for option in node["anyOf"]])
    kind = node.get("type")
    if kind is None and not set(node) - ANNOTATIONS:
        return JSON_VALUES
    builders = {
        "string": lambda: _strings(node),
        "object": lambda: _objects(node, root),
        "array": lambda: st.lists(_strategy(node["items"], root) if "items" in node else JSON_VALUES, max_size=3),
        "null": st.none,
        "boolean": st.booleans,
        "number": lambda: st.integers() | st.floats(allow_nan=False, allow_infinity=False),
        "integer": st.integers,
    }
    return builders[str(kind)]()


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    # Every reference in our schemas points into the document itself (by its $id, or by "#").
    base, _, pointer = ref.partition("#")
    if base and base != root.get("$id"):
        raise NotImplementedError(f"reference outside the document: {ref}")
    node: Any = root
    for part in pointer.strip("/").split("/"):
        node = node[part]
    return dict(node)


def _strings(node: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = node.get("minLength", 0), node.get("maxLength")
    if "pattern" in node:
        text = st.from_regex(node["pattern"], fullmatch=True)
    else:
        text = st.text(min_size=low, max_size=min(high if high is not None else 20, 20))
        if high is not None:
            text |= st.text(alphabet="xé🙂 ", min_size=high, max_size=high)  # right at the limit
    if "not" in node:
        refused = re.compile(node["not"]["pattern"])
        text = text.map(lambda value: refused.sub("", value))
    return text


def _objects(node: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    properties = node.get("properties", {})
    required = set(node.get("required", []))
    named = st.fixed_dictionaries(
        {name: _strategy(properties[name], root) for name in required},
        optional={name: _strategy(sub, root) for name, sub in properties.items() if name not in required},
    )
    extra = node.get("additionalProperties", True)
    if extra is False:
        return named
    keys = _strings({"type": "string", **node.get("propertyNames", {})}).filter(lambda k: k not in properties)
    values = JSON_VALUES if extra is True else _strategy(extra, root)
    limit = node.get("maxProperties")
    others = st.dictionaries(keys, values, max_size=3 if limit is None else min(3, limit))
    if limit is not None:
        # Right at the limit, with short keys and small values so the body still fits the transport.
        others |= st.dictionaries(st.text(max_size=6), st.none() | st.integers(), min_size=limit, max_size=limit)
    return st.builds(lambda known, more: {**more, **known}, named, others)
