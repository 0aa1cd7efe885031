"""Hostile experiments files: alias bombs, recursive anchors, devices and FIFOs are refused, fast."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from adapters.experiments import ReloadingRegistry
from worker import ExperimentRegistry
from worker.domain.errors import ConfigurationError

GOOD = """
experiments:
  - id: exp_a
    split: {A: 0.5, B: 0.5}
"""


def alias_bomb(levels: int = 9) -> str:
    """The classic "billion laughs" in variant metadata: ~500 bytes, 10**levels leaves once expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        refs = ", ".join([f"*l{level - 1}"] * 10)
        lines.append(f"l{level}: &l{level} [{refs}]")
    anchors = "\n".join(f"  {line}" for line in lines)
    return f"""x-anchors:
{anchors}
experiments:
  - id: exp_bomb
    split: {{A: 0.5, B: 0.5}}
    variants:
      A: {{payload: *l{levels - 1}}}
"""


#: Only a loader that blocks (a FIFO with no writer) or expands a bomb (minutes, gigabytes) outlasts this.
HANG_GUARD = 30.0


def load_within(path: Path, seconds: float = HANG_GUARD) -> BaseException | None:
    """ExperimentRegistry.load(path) in a thread; the exception it raised (the test fails if it hangs)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            ExperimentRegistry.load(path)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"loading {path} did not finish within {seconds} s"
    return outcome[0]


def test_an_alias_bomb_is_refused_quickly_by_the_expansion_it_would_cause(tmp_path: Path) -> None:
    """500 bytes that expand to a billion nodes: refused before expanding them, naming the file."""
    path = tmp_path / "experiments.yaml"
    path.write_text(alias_bomb(), encoding="utf-8")
    assert path.stat().st_size < 1000
    error = load_within(path)  # expanding them would take minutes and gigabytes, not the guard's 30 s
    assert isinstance(error, ConfigurationError)
    assert str(path) in str(error)
    assert "aliases expand this document" in str(error)


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    """An anchor that contains itself never expands: refused."""
    path = tmp_path / "experiments.yaml"
    path.write_text(
        "experiments:\n  - id: e\n    split: {A: 1.0}\n    variants:\n      A: &loop {self: *loop}\n", encoding="utf-8"
    )
    error = load_within(path)
    assert isinstance(error, ConfigurationError)
    assert "refers to itself" in str(error)


def test_ordinary_anchors_still_work(tmp_path: Path) -> None:
    """Sharing a split or metadata through an anchor is fine."""
    path = tmp_path / "experiments.yaml"
    path.write_text(
        "experiments:\n"
        "  - id: e1\n    split: &even {A: 0.5, B: 0.5}\n    variants: {A: &meta {tone: calm}}\n"
        "  - id: e2\n    split: *even\n    variants: {B: *meta}\n",
        encoding="utf-8",
    )
    registry = ExperimentRegistry.load(path)
    assert registry.get("e2") is not None
    assert registry.get("e2").metadata_for("B") == {"tone": "calm"}  # type: ignore[union-attr]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_symlink_to_dev_zero_is_refused_not_read(tmp_path: Path) -> None:
    """Without the check this reads /dev/zero until memory runs out."""
    path = tmp_path / "experiments.yaml"
    path.symlink_to("/dev/zero")
    error = load_within(path)
    assert isinstance(error, ConfigurationError)
    assert f"{path}: not a regular file (a character device)" in str(error)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until someone writes; the loader never waits."""
    path = tmp_path / "experiments.yaml"
    os.mkfifo(path)
    error = load_within(path)
    assert isinstance(error, ConfigurationError)
    assert "not a regular file (a FIFO)" in str(error)


def test_a_symlink_to_a_regular_file_is_fine(tmp_path: Path) -> None:
    """ConfigMap volumes are symlinks to regular files: followed."""
    target = tmp_path / "..data" / "experiments.yaml"
    target.parent.mkdir()
    target.write_text(GOOD, encoding="utf-8")
    link = tmp_path / "experiments.yaml"
    link.symlink_to(target)
    assert "exp_a" in ExperimentRegistry.load(link)


def test_a_reload_into_a_fifo_keeps_the_last_good_registry(tmp_path: Path) -> None:
    """The running worker's file is swapped for a FIFO: reported, not read, the old registry stays."""
    path = tmp_path / "experiments.yaml"
    path.write_text(GOOD, encoding="utf-8")
    errors: list[str] = []
    registry = ReloadingRegistry(path, interval=0.0, on_error=errors.append)
    path.unlink()
    os.mkfifo(path)
    started = time.monotonic()
    assert "exp_a" in registry.current()
    assert time.monotonic() - started < HANG_GUARD  # opening it for reading would wait for a writer forever
    assert len(errors) == 1
    assert "a FIFO" in errors[0]


def test_deep_nesting_is_a_clear_error(tmp_path: Path) -> None:
    """100,000 nested brackets: an error naming the file, not a RecursionError traceback."""
    path = tmp_path / "experiments.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    error = load_within(path)
    assert isinstance(error, ConfigurationError)
    assert "nested too deeply" in str(error)


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_a_lone_surrogate_in_a_variant_payload_is_refused_at_load(tmp_path: Path, suffix: str) -> None:
    """A "\\ud800" escape decodes to text with no UTF-8 encoding; stamped on every event, none could be sent.

    Accepted before: every request for that variant then failed serialising its event, and was
    abandoned until MaxDeliveryCountExceeded. Now the file is refused, naming the file and the field.
    """
    path = tmp_path / f"experiments.{suffix}"
    escaped = '{"experiments": [{"id": "e", "split": {"A": 0.5, "B": 0.5}, "variants": {"A": {"tone": "\\ud800"}}}]}'
    path.write_text(escaped, encoding="utf-8")  # JSON is YAML: the same text, both loaders
    with pytest.raises(ConfigurationError) as caught:
        ExperimentRegistry.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert "variants" in message
    assert "lone surrogate (U+D800" in message
