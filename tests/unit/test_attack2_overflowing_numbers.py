"""A JSON number literal that overflows a double (``1e400``) is refused as NaN and Infinity literals are.

Python's parser reads ``1e400`` as ``inf``: targeting compared it as infinity while the event and the
Kusto row carried ``null`` (JSON has no infinity), so what was decided and what was recorded disagreed.
No other language's parser keeps such a value (Go and Rust refuse it, JavaScript's becomes ``null``
once written back), so the worker refuses it as ``InvalidJson``, and so does every command that reads a
context as the worker would. An integer beyond the double range is exact in Python and is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker import ExperimentRegistry
from worker.cli import main
from worker.domain.errors import DeadLetterReason, PermanentError
from worker.service.handling import handle
from worker.service.ports import Delivery

REGISTRY = ExperimentRegistry.from_dict(
    {"experiments": [{"id": "e", "split": {"control": 0.5, "blue": 0.5}, "targeting": {"age": {"$gte": 18}}}]}
)
OVERFLOWING = ["1e400", "-1e400", "1.5E309", "9" * 400 + ".0", "-0.1e310"]


def _body(literal: str) -> bytes:
    return b'{"user_id": "U1", "experiment_id": "e", "context": {"age": ' + literal.encode() + b"}}"


@pytest.mark.parametrize("literal", OVERFLOWING)
def test_an_overflowing_number_is_invalid_json_not_an_event_holding_null(literal: str) -> None:
    """Dead-lettered InvalidJson (decided as infinity and recorded as null before), without quoting it."""
    with pytest.raises(PermanentError) as caught:
        handle(Delivery(_body(literal), "m1"), REGISTRY, context_allow_list={"age"})
    assert caught.value.reason is DeadLetterReason.INVALID_JSON
    assert "beyond the double range" in caught.value.description
    assert literal not in caught.value.description


@pytest.mark.parametrize(("literal", "kept"), [("1.7e308", 1.7e308), ("1e-400", 0.0), ("9" * 400, int("9" * 400))])
def test_numbers_a_double_holds_or_an_exact_integer_are_still_decided_and_recorded_as_sent(
    literal: str, kept: float
) -> None:
    """The largest doubles, underflow to zero (every parser rounds so) and big integers pass unchanged."""
    (event,) = handle(Delivery(_body(literal), "m1"), REGISTRY, context_allow_list={"age"}).events
    assert event.context == {"age": kept}
    assert json.loads(event.model_dump_json())["context"]["age"] == kept


@pytest.mark.parametrize(
    "command",
    [["explain", "--experiment", "e", "--user", "U1"], ["assign", "--experiment", "e", "--user", "U1"]],
    ids=["explain", "assign"],
)
def test_the_cli_refuses_an_overflowing_context_number_as_the_worker_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """explain and assign never answer for a context the worker would dead-letter: one line, exit 2."""
    (tmp_path / "experiments.json").write_text(
        json.dumps({"experiments": [{"id": "e", "split": {"a": 0.5, "b": 0.5}}]})
    )
    monkeypatch.setenv("AB_WORKER_EXPERIMENTS_FILE", str(tmp_path / "experiments.json"))
    assert main([*command, "--context", '{"age": [1e400]}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "beyond the double range" in err


def test_publish_refuses_an_overflowing_context_number_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """publish would send the request only for the worker to dead-letter it; nothing listens here."""
    monkeypatch.setenv(
        "AB_WORKER_SERVICEBUS_CONNECTION_STRING",
        "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true",
    )
    assert main(["publish", "--experiment", "e", "--user", "U1", "--context", '{"age": -1e400}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "beyond the double range" in err
