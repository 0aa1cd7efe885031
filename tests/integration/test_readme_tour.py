"""The README's short tour runs as written against the embedded broker: publish, watch events, replay a dead letter."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.local.broker import LocalBroker
from worker.cli import main
from worker.cli.common import ExitStatus

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]


def tour_lines() -> list[str]:
    """The command lines of the tour's shell blocks, in order, without the broker the fixture stands in for."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## A short tour") :]
    section = section[: section.index("\n## ", 1)]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    assert shlex.split(lines[0], comments=True) == ["make", "broker"]
    return [line for line in lines[1:] if line.strip()]


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalBroker]:
    """The embedded broker with its default entities, and a checkout-like working directory."""
    for name in list(os.environ):
        if name.startswith("AB_WORKER_"):
            monkeypatch.delenv(name)
    (tmp_path / "deploy").mkdir()
    shutil.copy(REPO / "deploy" / "experiments.yaml", tmp_path / "deploy" / "experiments.yaml")
    monkeypatch.chdir(tmp_path)
    with LocalBroker() as running:
        monkeypatch.setenv("AB_WORKER_HEALTH_PORT", "0")
        yield running


@pytest.mark.timeout(180)
def test_the_readme_tour_runs_as_written(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """U123 gets A of exp_001 (explain shows a gate); exp_new's is dead-lettered, configured, replayed, assigned."""
    outputs: list[tuple[list[str], str]] = []
    errors: list[tuple[list[str], str]] = []
    for line in tour_lines():
        argv = shlex.split(line, comments=True)
        if argv[0] == "export":
            monkeypatch.setenv("AB_WORKER_SERVICEBUS_CONNECTION_STRING", broker.connection_string)
        elif argv[0] == "ab-worker":
            status = main(argv[1:])
            out, err = capsys.readouterr()
            assert status == ExitStatus.OK, f"{line}: {err}"
            outputs.append((argv[1:], out))
            errors.append((argv[1:], err))
        else:
            subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True)

    tails = [json.loads(out) for argv, out in outputs if argv[:2] == ["events", "tail"]]
    assert [(event["experiment_id"], event["user_id"], event["variant_id"]) for event in tails] == [
        ("exp_001", "U123", "A"),
        ("exp_new", "U9", "B"),
    ]
    (explained,) = [out for argv, out in outputs if argv[:1] == ["explain"]]
    assert explained.splitlines()[-1] == "variant 'control', in_experiment false, reason coverage"
    assert re.search(
        r"^7  coverage   decided .*coverage:echovoice:exp_checkout_cta:U123  0\.952925  < 0\.5 ", explained, re.M
    )
    (summary,) = [out for argv, out in outputs if argv[:2] == ["dlq", "peek"]]
    assert re.search(r"^\s*1\s+UnknownExperiment$", summary, re.M), summary
    published = [err for argv, err in errors if argv[0] == "publish"]
    assert published == ["published 1 request to 'assignment-requests'\n"] * 2
    counts = broker.message_counts("assignment-requests")
    assert (counts["active"], counts["dead_letter"]) == (0, 0)
