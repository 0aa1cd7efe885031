"""Running the ``ab-worker`` command line in-process, for unit tests of its commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.cli import main


def experiments_file(directory: Path, registry: dict[str, Any]) -> str:
    """``registry`` written as ``experiments.yaml`` in ``directory``; its path."""
    path = directory / "experiments.yaml"
    path.write_text(yaml.safe_dump(registry), encoding="utf-8")
    return str(path)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``ab-worker *argv``: its exit status, stdout and stderr."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err
