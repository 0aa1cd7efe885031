"""Reading an experiments file: a regular file of bounded size, UTF-8, JSON or YAML without alias bombs.

Everything a hostile or broken file can do is refused here with the file (and line) named: the
model (:mod:`worker.domain.registry`) only ever sees a parsed document.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import yaml

from worker.domain.errors import ConfigurationError
from worker.domain.registry import ExperimentRegistry

#: A registry file larger than this is refused: it is configuration, not data.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: YAML aliases may add at most this many nodes to a document once expanded (see _check_alias_expansion).
MAX_ALIAS_EXPANSION = 100_000


def load_registry(path: str | os.PathLike[str]) -> ExperimentRegistry:
    """Read and validate a YAML or JSON registry file; errors name the file, experiment and field."""
    return ExperimentRegistry.from_dict(read_document(Path(path)), str(path))


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


def read_document(path: Path) -> object:
    """Parse a YAML (``.yaml``/``.yml``) or JSON file; errors name the file and position."""
    data = read_config_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=lambda pairs: _unique_json_keys(pairs, path))
        return _load_yaml(text, path)
    except ConfigurationError:
        raise
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


def _load_yaml(text: str, path: Path) -> object:
    """``yaml.safe_load`` that refuses documents whose aliases would blow up once expanded."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_alias_expansion(node, path)
        _check_unique_keys(node, path)
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


def _unique_json_keys(pairs: list[tuple[str, object]], path: Path) -> dict[str, object]:
    """A JSON object, refusing a key it repeats (the parser would keep the last one silently)."""
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise ConfigurationError(f"{path}: the key {key!r:.80} appears twice in one object; keep one")
        found[key] = value
    return found


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_unique_keys(root: yaml.Node, path: Path) -> None:
    """Refuse a mapping that repeats a key: PyYAML keeps the last one silently (YAML says keys are unique).

    ``overrides: {qa: blue, qa: control}`` or two ``coverage:`` lines are a mistake that would otherwise
    decide users quietly by whichever came last. Keys are compared as written with their resolved tag
    (so ``1`` and ``"1"`` differ, as they do once loaded); merge keys (``<<``) may override, as YAML says.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[tuple[str, str], yaml.Node] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                    continue
                first = keys.setdefault((key.tag, key.value), key)
                if first is not key:
                    raise ConfigurationError(
                        f"{path}: line {key.start_mark.line + 1}: the key {key.value!r:.80} appears twice in one "
                        f"mapping (first at line {first.start_mark.line + 1}); keep one"
                    )
        stack.extend(reversed(_child_nodes(node)))  # in document order, each mapping before those inside it


def _child_nodes(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []
