"""The README's and the manual's links lead somewhere a reader can open: files in the repository, headings in a page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
#: The README and every page of the manual (the seed documents are kept as received, so not checked).
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
WIRE_CONTRACT = (DOCS / "wire-contract.md").read_text(encoding="utf-8")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a ``# comment`` in a block is not a heading)."""
    return re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(page))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(page).splitlines() if re.match(r"#{1,6} ", line)}


def _local(page: Path) -> list[tuple[Path, str]]:
    """Each relative or ``#anchor`` link of ``page`` as (the file it opens, the anchor or "")."""
    targets = []
    for link in _links(page):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        targets.append(((page.parent / path).resolve() if path else page, anchor))
    return targets


def test_the_manual_has_its_pages() -> None:
    """The pages the README promises exist, so the checks below have something to read."""
    names = {page.name for page in PAGES}
    assert {"operations.md", "configuration.md", "wire-contract.md", "cli.md", "deployment.md"} <= names
    assert {"performance.md", "architecture.md", "testing.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_name_files_in_the_repository(page: Path) -> None:
    """Every relative link (the seed documents among them) opens a file that is in the repository."""
    missing = [str(target) for target, _ in _local(page) if not target.is_file()]
    assert missing == []


def test_the_seed_documents_are_linked() -> None:
    """The two seed documents the rule and the cohort strategy come from are linked from the README."""
    linked = {target for target, _ in _local(ROOT / "README.md")}
    assert DOCS / "seeds" / "ab_assignment_agent.md" in linked
    assert DOCS / "seeds" / "experiment_assignment_strategy.md" in linked


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_anchor_links_name_headings(page: Path) -> None:
    """Every ``#anchor`` link, within a page or to another one, matches a heading of the page it opens."""
    anchored = [(target, anchor) for target, anchor in _local(page) if anchor and target.suffix == ".md"]
    broken = [f"{target.name}#{anchor}" for target, anchor in anchored if anchor not in _headings(target)]
    assert broken == []


def test_the_readme_links_every_page_of_the_manual() -> None:
    """An operator reaches any page from the README in one click."""
    linked = {target for target, _ in _local(ROOT / "README.md")}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_anchor_links_are_checked() -> None:
    """The checks above see anchors between pages, not only within one (the link pattern still matches)."""
    anchors = [(target, anchor) for page in PAGES for target, anchor in _local(page) if anchor and target != page]
    assert len(anchors) >= 10


#: How a development log talks (what changed when); the pages say what is, and commit messages say what changed.
LOG_PHRASES = ("this round", "on main", "before this fix", "before the fix", "this change", "as rebuilt")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_pages_read_as_a_manual_not_a_development_log(page: Path) -> None:
    """No page says "after this round", "as rebuilt on main" or "before this fix"."""
    text = " ".join(page.read_text(encoding="utf-8").lower().split())
    assert [phrase for phrase in LOG_PHRASES if phrase in text] == []


# -- the Node.js publisher snippet and the wire contract ---------------------------------------------

REQUEST_SCHEMA = json.loads((ROOT / "schemas" / "assignment-request.schema.json").read_text(encoding="utf-8"))


def _node_snippet() -> str:
    start = WIRE_CONTRACT.index("Publishing from another language (Node.js)")
    block = re.search(r"```js\n(.*?)```", WIRE_CONTRACT[start:], re.S)
    assert block is not None, "docs/wire-contract.md no longer shows the Node.js publisher"
    return block.group(1)


def test_node_snippet_body_fields_are_the_request_schemas() -> None:
    """The snippet's body names only fields of the request schema, every required one, with valid literals."""
    snippet = _node_snippet()
    fields = dict(re.findall(r'^\s+"(\w+)": ("[^"]*"|[^,]+),', snippet, re.M))
    assert set(REQUEST_SCHEMA["required"]) <= set(fields)
    assert set(fields) <= set(REQUEST_SCHEMA["properties"])
    literals = {name: json.loads(value) for name, value in fields.items() if value.startswith('"')}
    body = {"user_id": "U123", "experiment_id": "exp_001", "request_id": "r-1", "context": {}} | literals
    Draft202012Validator(REQUEST_SCHEMA).validate(body)


def test_node_snippet_sets_the_documented_message_properties() -> None:
    """JSON bytes, content type, a message id reused on retry, correlation id and a reply queue the broker has."""
    from adapters.local.broker import BrokerConfig

    snippet = _node_snippet()
    assert 'Buffer.from(JSON.stringify(body), "utf8")' in snippet
    assert 'contentType: "application/json"' in snippet
    assert "messageId: requestId" in snippet
    assert "correlationId:" in snippet
    reply = re.search(r'replyTo: "([^"]+)"', snippet)
    assert reply is not None
    assert reply.group(1) in {queue.name for queue in BrokerConfig.default().queues}
    assert 'createSender("assignment-requests")' in snippet
    assert '.normalize("NFC")' in snippet
