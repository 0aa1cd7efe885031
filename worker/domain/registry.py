"""Experiment configuration: load and validate the registry file, and reload it when it changes.

A broken new file never replaces a good one: the last good configuration keeps running and the
problem is logged at ERROR with the file, experiment and field named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import JsonValue, ValidationError

from schemas.models import ExperimentConfig, ExperimentFile
from worker.domain.assignment import VariantTable, validate_split
from worker.domain.errors import ConfigurationError, SplitRatioError

log = logging.getLogger(__name__)

#: A registry file larger than this is refused: it is configuration, not data.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: YAML aliases may add at most this many nodes to a document once expanded (see _check_alias_expansion).
MAX_ALIAS_EXPANSION = 100_000


@dataclass(frozen=True, slots=True)
class Experiment:
    """A validated experiment with its splits compiled for lookups."""

    config: ExperimentConfig
    table: VariantTable
    segment_tables: Mapping[str, VariantTable] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The experiment id."""
        return self.config.id

    def table_for(self, segment: str | None) -> VariantTable:
        """The split for ``segment``: its override when configured, else the experiment's split."""
        if segment is not None:
            override = self.segment_tables.get(segment)
            if override is not None:
                return override
        return self.table

    def split_for(self, segment: str | None) -> Mapping[str, float]:
        """The ratios behind :meth:`table_for` (the segment's override, else the experiment's split)."""
        if segment is not None and segment in self.config.segments:
            return self.config.segments[segment]
        return self.config.split

    def metadata_for(self, variant_id: str) -> dict[str, JsonValue]:
        """The variant's metadata from the configuration (empty when none)."""
        return dict(self.config.variants.get(variant_id, {}))


class ExperimentRegistry:
    """An immutable set of experiments, looked up by id."""

    def __init__(self, experiments: Mapping[str, Experiment], source: str = "<memory>") -> None:
        self._experiments = dict(experiments)
        self.source = source

    def get(self, experiment_id: str) -> Experiment | None:
        """The experiment, or None when it is not configured."""
        return self._experiments.get(experiment_id)

    def __contains__(self, experiment_id: object) -> bool:
        return experiment_id in self._experiments

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self._experiments.values())

    def __len__(self) -> int:
        return len(self._experiments)

    @classmethod
    def from_configs(cls, configs: list[ExperimentConfig], source: str = "<memory>") -> ExperimentRegistry:
        """Compile validated configs; raises :class:`ConfigurationError` naming source and experiment."""
        problems: list[str] = []
        experiments: dict[str, Experiment] = {}
        for config in configs:
            if config.id in experiments:
                problems.append(f"{source}: experiment {config.id!r}: duplicate id")
                continue
            compiled = _compile(config, source, problems)
            if compiled is not None:
                experiments[config.id] = compiled
        if problems:
            raise ConfigurationError("\n".join(problems))
        return cls(experiments, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> ExperimentRegistry:
        """Validate a parsed registry document (``{"experiments": [...]}``)."""
        try:
            parsed = ExperimentFile.model_validate(data)
        except ValidationError as exc:
            problems = [_describe_validation(exc, data, source), *_problems_beyond_fields(data, source)]
            raise ConfigurationError("\n".join(problems)) from None
        return cls.from_configs(parsed.experiments, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExperimentRegistry:
        """Read and validate a YAML or JSON registry file."""
        return cls.from_dict(read_document(Path(path)), str(path))

    @classmethod
    def single(
        cls,
        experiment_id: str,
        split: Mapping[str, float],
        seed: str = "echovoice",
        version: str = "1",
    ) -> ExperimentRegistry:
        """A registry of one experiment, for the command line's ``--split``/``--seed``."""
        try:
            config = ExperimentConfig(id=experiment_id, split=dict(split), seed=seed, version=version)
        except ValidationError as exc:
            raise ConfigurationError(_describe_validation(exc, {}, "--split")) from None
        return cls.from_configs([config], "--split")


def _problems_beyond_fields(data: Any, source: str) -> list[str]:
    """Duplicate ids and split problems of a file that also has field errors, so one run lists all."""
    items = data.get("experiments") if isinstance(data, dict) else None
    problems: list[str] = []
    seen: set[str] = set()
    for item in items if isinstance(items, list) else []:
        experiment_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(experiment_id, str):
            if experiment_id in seen:
                problems.append(f"{source}: experiment {experiment_id!r}: duplicate id")
                continue
            seen.add(experiment_id)
        try:
            config = ExperimentConfig.model_validate(item)
        except ValidationError:
            continue  # its field errors are already listed
        _compile(config, source, problems)
    return problems


def _compile(config: ExperimentConfig, source: str, problems: list[str]) -> Experiment | None:
    where = f"{source}: experiment {config.id!r}"
    try:
        table = VariantTable(validate_split(config.split))
    except SplitRatioError as exc:
        problems.append(f"{where}: field 'split': {exc}")
        return None
    unknown = sorted(set(config.variants) - set(config.split))
    if unknown:
        problems.append(f"{where}: field 'variants': metadata for variants not in the split: {unknown}")
    segment_tables: dict[str, VariantTable] = {}
    for segment, split in config.segments.items():
        try:
            segment_tables[segment] = VariantTable(validate_split(split))
        except SplitRatioError as exc:
            problems.append(f"{where}: field 'segments.{segment}': {exc}")
            continue
        extra = sorted(set(split) - set(config.split))
        if extra:
            problems.append(f"{where}: field 'segments.{segment}': variants not in the experiment's split: {extra}")
    return Experiment(config, table, segment_tables)


def read_config_bytes(path: Path) -> bytes:
    """The file's bytes: a regular file (symlinks followed) of at most ``MAX_CONFIG_BYTES``.

    Anything else — ``/dev/zero``, a FIFO, a directory, a socket — is refused by its kind before a
    byte is read (a FIFO is opened non-blocking, so a missing writer cannot hang the worker).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read file ({exc.strerror})") from None
    # Checked before os.fdopen, which itself refuses a directory with an error naming the descriptor.
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigurationError(
            f"{path}: not a regular file ({_file_kind(mode)}); the experiments file must be a regular file"
        )
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigurationError(f"{path}: cannot read file ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigurationError(f"{path}: file is over {MAX_CONFIG_BYTES} bytes, the limit")
    return data


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def read_document(path: Path) -> Any:
    """Parse a YAML (``.yaml``/``.yml``) or JSON file; errors name the file and position."""
    data = read_config_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return _load_yaml(text, path)
    except RecursionError:
        raise ConfigurationError(f"{path}: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigurationError(f"{path}: invalid YAML{where}: {problem}") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML raises plain ValueErrors for scalars it cannot build, such as 2001-13-45 or !!int x.
        raise ConfigurationError(f"{path}: invalid YAML value: {exc}") from None


def _load_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` that refuses documents whose aliases would blow up once expanded."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_alias_expansion(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_alias_expansion(root: yaml.Node, path: Path) -> None:
    """Refuse recursive aliases, and aliases adding over ``MAX_ALIAS_EXPANSION`` nodes once expanded.

    An alias (``*name``) is cheap in the file but every consumer — validation, events, rows — walks
    it as a full copy: 500 bytes of nested aliases expand to billions of nodes (an "alias bomb").
    Sizes are counted on the node graph with memoisation, so the check itself stays linear.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _child_nodes(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigurationError(f"{path}: a YAML alias refers to itself (recursive anchors are not allowed)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    expanded = sizes[id(root)]
    if expanded - len(sizes) > MAX_ALIAS_EXPANSION:
        raise ConfigurationError(
            f"{path}: YAML aliases expand this document to {expanded:,} nodes from {len(sizes):,}; aliases may add "
            f"at most {MAX_ALIAS_EXPANSION:,} (an alias bomb?)"
        )


def _child_nodes(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _describe_validation(exc: ValidationError, data: Any, source: str) -> str:
    """One line per problem: file, experiment (by id when readable), field path, message."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        where = source
        if len(loc) >= 2 and loc[0] == "experiments" and isinstance(loc[1], int):
            where += f": experiment {_experiment_label(data, loc[1])}"
            loc = loc[2:]
        path = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; unknown keys are not allowed)"
        lines.append(f"{where}: field '{path}': {message}")
    return "\n".join(lines)


def _experiment_label(data: Any, index: int) -> str:
    try:
        experiment_id = data["experiments"][index]["id"]
    except (KeyError, IndexError, TypeError):
        return f"#{index + 1}"
    return repr(experiment_id) if isinstance(experiment_id, str) else f"#{index + 1}"


def _fingerprint(path: Path) -> tuple[int, int, str] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    try:
        digest = hashlib.sha256(read_config_bytes(path)).hexdigest()
    except ConfigurationError as exc:
        # Unusable (too large, not a regular file): still a change, so the reload reports why.
        digest = f"unusable: {exc}"
    return (info.st_mtime_ns, info.st_size, digest)


class ReloadingRegistry:
    """Serves the registry from a file and picks up changes, checked at most every ``interval`` s.

    The pump calls :meth:`current` once per batch. An idle worker calls it rarely, so
    :meth:`watching` also checks the file every ``interval`` seconds from a thread, and a broken
    edit is reported when it is made, not when the next message arrives. A broken new file keeps
    the last good registry running; ``on_error`` (and an ERROR log) reports it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        interval: float = 2.0,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._clock = clock
        self._on_error = on_error
        self._registry = ExperimentRegistry.load(self.path)
        self._seen = _fingerprint(self.path)
        self._checked_at = clock()
        self._lock = threading.Lock()
        self.reloads = 0
        self.failed_reloads = 0

    def __call__(self) -> ExperimentRegistry:
        """The current registry: a ``ReloadingRegistry`` is what the pump asks for a registry with."""
        return self.current()

    def current(self) -> ExperimentRegistry:
        """The newest good registry, reloading first when the file has changed."""
        now = self._clock()
        if now - self._checked_at >= self.interval:
            self._checked_at = now
            self.refresh()
        return self._registry

    @contextmanager
    def watching(self) -> Iterator[ReloadingRegistry]:
        """Check the file every ``interval`` seconds from a daemon thread while the block runs."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(self.interval):
                self.current()

        thread = threading.Thread(target=watch, name="experiments-file-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def refresh(self) -> bool:
        """Reload now if the file changed; True when a new configuration was installed."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        seen = _fingerprint(self.path)
        if seen is None or seen == self._seen:
            return False
        self._seen = seen
        try:
            registry = ExperimentRegistry.load(self.path)
        except Exception as exc:  # a bad edit must never stop a running worker, whatever it raises
            self.failed_reloads += 1
            log.error("Experiment configuration NOT reloaded; still running the last good one:\n%s", exc)
            if self._on_error is not None:
                self._on_error(str(exc))
            return False
        self._registry = registry
        self.reloads += 1
        log.info("Experiment configuration reloaded from %s: %d experiments", self.path, len(registry))
        return True
