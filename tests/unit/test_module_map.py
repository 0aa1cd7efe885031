"""docs/architecture.md's module map ("Where things are") names every module and package of the product's layers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The packages whose every module (or subpackage) the map names.
MAPPED = (
    "worker",
    "worker/domain",
    "worker/service",
    "worker/cli",
    "adapters",
    "adapters/servicebus",
    "adapters/kusto",
    "adapters/experiments",
    "adapters/local",
)


def module_map() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    start = text.index("## Where things are")
    return text[start : text.index("Imports flow", start)]


def children(package: str) -> list[str]:
    """The modules (stems) and subpackages of ``package``, without dunder modules."""
    found = []
    for path in sorted((ROOT / package).iterdir()):
        if path.is_dir() and (path / "__init__.py").exists():
            found.append(path.name)
        elif path.suffix == ".py" and not path.stem.startswith("__"):
            found.append(path.stem)
    return found


@pytest.mark.parametrize("package", MAPPED)
def test_the_module_map_names_every_module(package: str) -> None:
    """A module added (or renamed) without its line in the map fails here."""
    text = module_map()
    missing = [name for name in children(package) if not re.search(rf"(?<![\w/.]){re.escape(name)}\b", text)]
    assert missing == [], f"docs/architecture.md's module map does not name {missing} of {package}/"
