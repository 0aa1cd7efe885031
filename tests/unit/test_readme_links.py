"""The README's links lead somewhere a reader can open: files in the repository, headings in the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jsonschema import Draft202012Validator

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


# -- the Node.js publisher snippet and the wire contract ---------------------------------------------

REQUEST_SCHEMA = json.loads((ROOT / "schemas" / "assignment-request.schema.json").read_text(encoding="utf-8"))


def _node_snippet() -> str:
    start = README.index("### Publishing from another language (Node.js)")
    block = re.search(r"```js\n(.*?)```", README[start:], re.S)
    assert block is not None, "the README no longer shows the Node.js publisher"
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
