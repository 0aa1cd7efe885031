"""One rule for the characters an id may hold (schemas/text.py), applied alike on every surface."""

from __future__ import annotations

import io
import json
import sys
import unicodedata

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas import AssignmentRequest
from schemas.generate import HERE
from schemas.text import refused_character
from worker import ABAssignmentAgent
from worker.domain.cohort.members import value_problem
from worker.domain.registry import ExperimentRegistry
from worker.service.batch import assign_file

REFUSED = {
    "NUL": "\x00",
    "TAB": "\t",
    "LF": "\n",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "C1 PAD": "\x80",
    "NEL": "\x85",
    "C1 APC": "\x9f",
    "soft hyphen": "\xad",
    "Arabic letter mark": "\u061c",
    "Mongolian vowel separator": "\u180e",
    "zero-width space": "\u200b",
    "zero-width joiner": "\u200d",
    "right-to-left mark": "\u200f",
    "line separator": "\u2028",
    "paragraph separator": "\u2029",
    "right-to-left override": "\u202e",
    "word joiner": "\u2060",
    "first-strong isolate": "\u2068",
    "byte-order mark": "\ufeff",
    "interlinear annotation": "\ufffb",
    "lone surrogate": "\ud800",
}
ALLOWED = {
    "space": " ",
    "no-break space": "\xa0",
    "e acute": "é",
    "combining acute": "\u0301",
    "CJK": "用",
    "emoji": "🙂",
    "variation selector": "\ufe0f",
    "emoji tag": "\U000e0067",
    "Arabic": "ش",
    "ideographic space": "\u3000",
    "private use": "\ue000",
}
CASES = [(name, char, True) for name, char in REFUSED.items()] + [(n, c, False) for n, c in ALLOWED.items()]
VALIDATOR = Draft202012Validator(json.loads((HERE / "assignment-request.schema.json").read_text(encoding="utf-8")))


@pytest.mark.parametrize(("name", "char", "refused"), CASES, ids=[c[0] for c in CASES])
def test_every_surface_applies_the_one_rule(name, char, refused):
    """Contract model, JSON Schema, Python API and cohort stratify refuse and allow the same characters."""
    user = f"a{char}b"
    try:
        AssignmentRequest.model_validate({"user_id": user, "experiment_id": "e"})
        model_refuses = False
    except ValidationError:
        model_refuses = True
    try:
        ABAssignmentAgent().assign_user(user, "e")
        agent_refuses = False
    except ValueError:
        agent_refuses = True
    verdicts = {
        "model": model_refuses,
        "schema": not VALIDATOR.is_valid({"user_id": user, "experiment_id": "e"}),
        "agent": agent_refuses,
        "stratify": value_problem(user) is not None,
    }
    assert verdicts == dict.fromkeys(verdicts, refused), name


def test_assign_file_skips_exactly_the_refused_ids():
    """`ab-worker assign --input` skips rows whose user_id breaks the rule, and only those."""
    rows = [f"a{char}b" for _, char, _ in CASES]
    stream = io.StringIO("".join(json.dumps({"user_id": row}) + "\n" for row in rows))
    experiment = ExperimentRegistry.single("e", {"A": 0.5, "B": 0.5}).get("e")
    assert experiment is not None
    out = io.StringIO()
    result = assign_file(iter(stream), out, experiment, in_format="jsonl", out_format="jsonl", source="mem")
    skipped = {bad.line for bad in result.bad_rows}
    assert skipped == {line for line, (_, _, refused) in enumerate(CASES, start=1) if refused}
    assert all("user_id must not contain control, invisible or bidi characters" in b.problem for b in result.bad_rows)


def test_refused_set_is_controls_separators_and_invisible_format_characters():
    """Every refused code point is Cc, Cf, Cs, Zl, Zp (or unassigned inside a format block), and
    every Cc, Cs, Zl and Zp code point is refused; the fast path's isprintable() shortcut is sound."""
    refused = [chr(c) for c in range(sys.maxunicode + 1) if refused_character(f"x{chr(c)}") is not None]
    categories = {unicodedata.category(c) for c in refused}
    assert categories <= {"Cc", "Cf", "Cs", "Zl", "Zp", "Cn"}
    assert not any(c.isprintable() for c in refused)
    always = {"Cc", "Cs", "Zl", "Zp"}
    assert all(refused_character(chr(c)) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in always)
