"""The log level: ``--log-level`` before or after the command, else AB_WORKER_LOG_LEVEL, else INFO."""

from __future__ import annotations

import json
import logging
import os

import pytest

from worker.cli import main


@pytest.fixture
def files(tmp_path, monkeypatch):
    """An experiments file and a one-request input, a clean environment, and the root level restored after."""
    for name in [k for k in os.environ if k.upper().startswith("AB_WORKER_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "experiments.json"
    config.write_text(json.dumps({"experiments": [{"id": "e", "split": {"A": 0.5, "B": 0.5}}]}), encoding="utf-8")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"user_id": "U1", "experiment_id": "e"}) + "\n", encoding="utf-8")
    root = logging.getLogger()
    level = root.level
    yield ["--config", str(config), "--input", str(requests), "--output", str(tmp_path / "events.jsonl")]
    root.setLevel(level)


@pytest.mark.parametrize(
    ("before", "after", "env_level", "expected"),
    [
        ([], [], None, logging.INFO),
        ([], [], "ERROR", logging.ERROR),
        ([], [], "debug", logging.DEBUG),
        ([], ["--log-level", "ERROR"], None, logging.ERROR),
        (["--log-level", "WARNING"], [], "DEBUG", logging.WARNING),
        (["--log-level", "WARNING"], ["--log-level", "ERROR"], "DEBUG", logging.ERROR),
    ],
    ids=["default-info", "env", "env-lowercase", "flag-after-command", "flag-beats-env", "last-flag-wins"],
)
def test_log_level_from_flag_anywhere_or_environment(files, monkeypatch, before, after, env_level, expected):
    """AB_WORKER_LOG_LEVEL is honoured; the flag wins over it, given before or after the command."""
    if env_level is not None:
        monkeypatch.setenv("AB_WORKER_LOG_LEVEL", env_level)
    assert main([*before, "run", *files, *after]) == 0
    assert logging.getLogger().level == expected


def test_bad_log_level_in_environment_is_a_usage_error(files, monkeypatch, capsys):
    """An unknown AB_WORKER_LOG_LEVEL is named in one line, exit 2."""
    monkeypatch.setenv("AB_WORKER_LOG_LEVEL", "LOUD")
    assert main(["run", *files]) == 2
    assert "AB_WORKER_LOG_LEVEL" in capsys.readouterr().err


def test_supervised_children_inherit_the_level():
    """run --processes: a flag is passed on to each child; without one, the children read the environment."""
    from argparse import Namespace

    from worker.cli.supervise import child_command

    flagged = child_command(Namespace(log_level="DEBUG", max_batch=None, drain=False), "x.yaml")
    assert flagged[flagged.index("--log-level") + 1] == "DEBUG"
    assert "--log-level" not in child_command(Namespace(log_level=None, max_batch=None, drain=False), "x.yaml")
