"""The ``sdk_internals`` contract of ``make lint`` (tests/sdk_boundary.py): what it flags, and what it leaves alone.

It must see a private access however it is written (attribute, ``getattr`` with the name as a
string, an import of a private module) and never flag the product's own privates, nor a private of
the standard library that no SDK defines.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.sdk_boundary import Use, is_private, misplaced_uses, private_uses, sdk_private_names

SERVICEBUS = "azure.servicebus"
KUSTO = "azure.kusto"
ALLOWED = {SERVICEBUS: "adapters.servicebus.internals", KUSTO: "adapters.kusto.internals"}


def names() -> dict[str, frozenset[str]]:
    return {sdk: sdk_private_names(sdk) for sdk in ALLOWED}


def flagged(source: str, ours: frozenset[str] = frozenset()) -> list[str]:
    return [use.what for use in private_uses(source, names(), ours)]


def test_the_installed_sdks_define_the_names_the_product_relies_on() -> None:
    """Read from the installed SDK's source: its definitions, not every underscore it happens to use."""
    servicebus, kusto = names()[SERVICEBUS], names()[KUSTO]
    assert {"_handler", "_link", "_delivery_id", "_renew_locks", "_further_pull_receive_timeout"} <= servicebus
    assert {"_kusto_client", "_resource_manager", "_session"} <= kusto
    assert "_exit" not in servicebus  # os._exit is used by the SDK, not defined by it
    assert not is_private("__init__")


@pytest.mark.parametrize(
    "source",
    [
        'handler = getattr(receiver, "_handler", None)',  # the link identity check that failed open (issue 17 §3)
        "link = receiver._handler._link",
        "receiver._further_pull_receive_timeout = 0.002",
        'hasattr(owner, "_session")',
        "from azure.servicebus._pyamqp.error import AMQPException",
        "from azure.servicebus import _pyamqp",
        "import azure.servicebus._pyamqp.client",
    ],
)
def test_each_way_of_reaching_an_sdk_private_is_flagged(source: str) -> None:
    """Attribute, by-name built-in, import of a private module or name: all seen."""
    assert flagged(source)


def test_the_products_own_privates_and_the_standard_librarys_are_left_alone() -> None:
    """``self._x``, a name the module's own package defines, ``os._exit``, ``argparse._SubParsersAction``."""
    source = "\n".join(
        [
            "self._handler = handler",
            "self._client._lock",  # reached on self first: _client is ours; _lock both define, ours here
            "other._lock.acquire()",
            "os._exit(1)",
            "argparse._SubParsersAction",
            'getattr(self, "_handler")',
            "from adapters.local.standins._http import HttpStandIn",
        ]
    )
    assert flagged(source, ours=frozenset({"_lock", "_client"})) == []


def test_a_name_both_sdks_define_belongs_to_either_internals_module(tmp_path: Path) -> None:
    """``_session`` is private to both SDKs: allowed in either internals module, flagged anywhere else."""
    assert "_session" in names()[SERVICEBUS] & names()[KUSTO]
    (tmp_path / "kusto").mkdir()
    (tmp_path / "kusto" / "internals.py").write_text("session = client._kusto_client._session\n")
    (tmp_path / "kusto" / "sink.py").write_text("session = owner._session\n")
    paths = {
        "adapters.kusto.internals": tmp_path / "kusto" / "internals.py",
        "adapters.kusto.sink": tmp_path / "kusto" / "sink.py",
    }
    ((module, use),) = misplaced_uses(paths, ALLOWED)
    assert (module, use) == ("adapters.kusto.sink", Use(1, "._session", (SERVICEBUS, KUSTO)))


def test_the_product_touches_the_sdks_private_surface_only_in_the_internals_modules() -> None:
    """What ``make lint`` checks, over every module of the product, from the contract's own configuration."""
    config = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "sdk_internals"]
    allowed = dict(tuple(part.strip() for part in entry.split(":", 1)) for entry in contract["internals"])
    assert allowed == ALLOWED
    paths = {}
    for root in config["root_packages"]:
        for path in Path(root).rglob("*.py"):
            parts = path.with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    assert "adapters.servicebus.settle" in paths
    assert misplaced_uses(paths, allowed) == []
    # And the check reaches them: allowed nowhere, every use is found in the two internals modules.
    nowhere = dict.fromkeys(allowed, "nowhere")
    assert {module for module, _ in misplaced_uses(paths, nowhere)} == set(ALLOWED.values())
