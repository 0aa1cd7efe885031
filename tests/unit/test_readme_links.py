"""The README's links lead somewhere a reader can open: files in the repository, headings in the README."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
LINKS = re.findall(r"\]\(([^)\s]+)\)", README)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_name_files_in_the_repository() -> None:
    """Every relative link (the seed documents among them) opens a file that is in the repository."""
    relative = [link.split("#")[0] for link in LINKS if not link.startswith(("http://", "https://", "#", "mailto:"))]
    assert "docs/seeds/ab_assignment_agent.md" in relative
    assert "docs/seeds/experiment_assignment_strategy.md" in relative
    missing = [link for link in relative if not (ROOT / link).is_file()]
    assert missing == []


def test_anchor_links_name_headings_of_the_readme() -> None:
    """Every ``#anchor`` link matches a heading."""
    headings = {_slug(line.lstrip("#")) for line in README.splitlines() if re.match(r"#{1,6} ", line)}
    anchors = [link[1:] for link in LINKS if link.startswith("#")]
    assert anchors
    assert [a for a in anchors if a not in headings] == []
