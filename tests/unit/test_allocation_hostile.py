"""The allocation features against hostile experiments files: a clear, one-line, terminal-safe error for each.

Found by attacking the registry and ``validate-config`` as an adversary (and a careless operator)
would; each test failed before its fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.cli import main
from worker.domain.errors import ConfigurationError
from worker.domain.registry import ExperimentRegistry


def _file(**fields: Any) -> dict[str, Any]:
    return {"experiments": [{"id": "e", "split": {"control": 0.5, "blue": 0.5}, **fields}]}


#: Times in the grammar of docs/allocation.md §2.6 whose instant leaves years 0001–9999 once in UTC.
EDGE_TIMES = ("0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01", "9999-12-31T23:59:59.999999999-23:59")


@pytest.mark.parametrize("text", EDGE_TIMES)
@pytest.mark.parametrize(
    "fields",
    [
        lambda t: {"start_at": t},
        lambda t: {"end_at": t},
        lambda t: {"targeting": {"signup_at": {"$gte": t}}},
        lambda t: {"targeting": {"$or": [{"plan": "pro"}, {"signup_at": {"$lt": t}}]}},
    ],
    ids=["start_at", "end_at", "$gte operand", "nested $lt operand"],
)
def test_a_configured_time_that_leaves_the_years_1_to_9999_in_utc_is_a_configuration_error(
    fields: Any, text: str
) -> None:
    """Before: OverflowError from the UTC datetime (`validate-config`: 'internal error', exit 70; a
    reload: a crash), for a time the grammar admits. Now a configuration error naming the field."""
    with pytest.raises(ConfigurationError, match="outside the years 0001 to 9999 once converted to UTC"):
        ExperimentRegistry.from_dict(_file(**fields(text)))


def test_the_same_instants_in_a_request_context_are_simply_times() -> None:
    """The attribute side never formats an instant: such a time in a context compares, and never raises."""
    registry = ExperimentRegistry.from_dict(_file(targeting={"signup_at": {"$lt": "2026-01-01T00:00:00Z"}}))
    for text in EDGE_TIMES:
        decision = registry.assign("e", "U1", context={"signup_at": text})
        assert decision.reason == ("bucketed" if text.startswith("0001") else "targeting")


def test_validate_config_reports_an_edge_time_in_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The YAML form too: an unquoted time is read by PyYAML as an aware datetime."""
    config = tmp_path / "experiments.yaml"
    config.write_text(
        "experiments:\n  - id: e\n    split: {control: 0.5, blue: 0.5}\n    start_at: 0001-01-01T00:00:00+23:59\n"
    )

    assert main(["validate-config", str(config)]) == 2

    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "internal error" not in err
    assert f"{config}: experiment 'e': field 'start_at':" in err


@pytest.mark.parametrize(
    ("fields", "hostile"),
    [
        ({"overrides": {"qa\x1b[2Jall": "blue"}}, "\x1b[2J"),  # a pydantic field path (an override key)
        ({"split": {"control": 0.5, "blue\x1b]0;owned\x07": 0.5}}, "\x1b]0;owned\x07"),  # a variant id
        ({"targeting": {"x\x1b[31m": {"$bogus": 1}}}, "\x1b[31m"),  # a condition's path
        ({"targeting": {"x": {"$bogus\u202e": 1}}}, "\u202e"),  # a bidi override in an operator
        ({"targeting": {"a\u2028b": {"$bogus": 1}}}, "\u2028"),  # a line separator splits no problem
    ],
    ids=["override key", "variant id", "attribute name", "operator", "line separator"],
)
def test_validate_config_never_sends_a_control_character_from_the_file_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], hostile: str
) -> None:
    """Before: the key went to stderr raw, so an ESC sequence in a file under review cleared the
    reviewer's screen or retitled the terminal, and U+2028 split one problem into two lines."""
    config = tmp_path / "experiments.json"
    config.write_text(json.dumps(_file(**fields)))

    assert main(["validate-config", str(config)]) == 2

    err = capsys.readouterr().err
    assert not any(ch in err for ch in hostile if not ch.isprintable()), repr(err)
    assert err.count("\n") == 1, repr(err)
    assert "\\x1b" in err or "\\u202e" in err or "\\u2028" in err


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        (
            "experiments.yaml",
            "experiments:\n  - id: e\n    split: {control: 0.5, blue: 0.5}\n"
            "    overrides:\n      qa-1: blue\n      qa-1: control\n",
            "line 6: the key 'qa-1' appears twice in one mapping (first at line 5)",
        ),
        (
            "experiments.yaml",
            "experiments:\n  - id: e\n    split: {control: 0.5, blue: 0.5}\n    coverage: 1\n    coverage: 0.1\n",
            "line 5: the key 'coverage' appears twice in one mapping (first at line 4)",
        ),
        (
            "experiments.json",
            '{"experiments": [{"id": "e", "split": {"control": 0.5, "blue": 0.5},'
            ' "overrides": {"qa-1": "blue", "qa-1": "control"}}]}',
            "the key 'qa-1' appears twice in one object",
        ),
    ],
    ids=["yaml override", "yaml field", "json override"],
)
def test_a_key_repeated_in_one_mapping_of_the_experiments_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, said: str
) -> None:
    """Before: the parsers kept the last value silently, so `qa-1` was quietly served control and a
    ramp written twice ran at whichever line came last; `validate-config` said the file was valid."""
    config = tmp_path / name
    config.write_text(text)

    assert main(["validate-config", str(config)]) == 2

    err = capsys.readouterr().err
    assert err == f"ab-worker validate-config: error: {config}: {said}; keep one\n"


def test_a_merge_key_may_still_override_what_it_merges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """YAML's ``<<`` merge is how a file shares a split; a key beside it overrides, as YAML says."""
    config = tmp_path / "experiments.yaml"
    config.write_text(
        "experiments:\n  - id: a\n    split: &half {control: 0.5, blue: 0.5}\n"
        "  - id: b\n    split:\n      <<: *half\n      control: 0.5\n"
    )

    assert main(["validate-config", str(config)]) == 0


@pytest.mark.parametrize(
    "at", ["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01", "99999999999h", "5000000w", "1" + "0" * 40 + "d"]
)
@pytest.mark.parametrize(
    "command",
    [
        ["explain", "--experiment", "e", "--user", "U1", "--at"],
        ["assign", "--experiment", "e", "--user", "U1", "--at"],
        ["dlq", "peek", "--since"],
        ["report", "--rows", "rows.jsonl", "--since"],
    ],
    ids=["explain --at", "assign --at", "dlq peek --since", "report --since"],
)
def test_a_time_or_age_outside_the_datetime_range_is_one_line_naming_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str], at: str
) -> None:
    """Before: a traceback (OverflowError from astimezone, or from a timedelta of 10^11 hours) instead
    of the one-line usage error every other bad time gets; now the flag is named with why."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments.json").write_text(json.dumps(_file()))
    (tmp_path / "rows.jsonl").write_text("")
    monkeypatch.setenv("AB_WORKER_EXPERIMENTS_FILE", str(tmp_path / "experiments.json"))
    monkeypatch.setenv(
        "AB_WORKER_SERVICEBUS_CONNECTION_STRING",
        "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true",
    )

    assert main([*command, at]) == 2

    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    assert f"{command[-1]}: {at!r} is " in err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "command",
    [
        ["explain", "--experiment", "e", "--user", "U1"],
        ["assign", "--experiment", "e", "--user", "U1"],
        ["publish", "--experiment", "e", "--user", "U1"],
    ],
    ids=["explain", "assign", "publish"],
)
def test_a_context_holding_nan_or_infinity_is_refused_as_the_worker_refuses_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    literal: str,
) -> None:
    """The worker dead-letters a body holding NaN or Infinity as InvalidJson; explain and assign
    answered for such a context anyway (json_context promises never to answer for a request the worker
    would dead-letter), and publish sent it only for it to be dead-lettered. Now each refuses it."""
    (tmp_path / "experiments.json").write_text(json.dumps(_file()))
    monkeypatch.setenv("AB_WORKER_EXPERIMENTS_FILE", str(tmp_path / "experiments.json"))
    # publish refuses before connecting: nothing listens here.
    monkeypatch.setenv(
        "AB_WORKER_SERVICEBUS_CONNECTION_STRING",
        "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true",
    )

    assert main([*command, "--context", f'{{"age": [{literal}]}}']) == 2

    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"{literal} is not a JSON number" in err
