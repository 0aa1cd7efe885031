"""The import-linter contract ``sdk_internals``: each SDK's private surface is touched by one module.

import-linter sees imports, not attribute access, and forbids external packages only whole
(``azure``, never ``azure.servicebus._pyamqp``). This contract reads the product's source instead
and fails on any use of an SDK's private surface outside that SDK's internals module:

* an import of one of its private modules or names (``from azure.servicebus._pyamqp.error import
  AMQPException``, ``from azure.servicebus import _pyamqp``);
* an attribute access ``x._name``, or ``getattr``/``hasattr``/``setattr``/``delattr`` with the
  literal ``"_name"``, where ``_name`` is a private attribute the installed SDK defines (a method
  ``def _name``, an assignment ``self._name = ...`` or a class attribute) and the product does not.

The second rule is precise without knowing the type of ``x``: names the SDK defines and the product
defines too (``_client``, ``_lock``) are ambiguous and left alone, so the product's own privates are
never flagged. It runs in ``make lint`` (``lint-imports``); ``tests/unit/test_sdk_boundary.py``
checks what it flags.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from importlinter import Contract, ContractCheck, fields, output

#: The built-ins that reach an attribute by a name given as a string.
_BY_NAME = frozenset({"getattr", "hasattr", "setattr", "delattr"})


def is_private(name: str) -> bool:
    """``_name`` but not ``__name__``: what a library keeps to itself."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Use:
    """One use of an SDK's private surface: where, what, and the SDKs it may belong to (a name several define)."""

    line: int
    what: str
    sdks: tuple[str, ...]


def package_files(package: str) -> list[Path]:
    """The ``.py`` files of an installed (possibly namespace) package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return []
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        return [Path(spec.origin)]
    return sorted(path for root in roots for path in Path(root).rglob("*.py"))


def defined_private_names(sources: Iterable[str]) -> frozenset[str]:
    """The private attribute names these sources define: methods, ``x._name = ...`` targets, class attributes."""
    names: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    names.update(_class_attributes(node))
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(
                    t.attr
                    for target in targets
                    for t in ast.walk(target)
                    if isinstance(t, ast.Attribute) and _on_self(t)
                )
    return frozenset(name for name in names if is_private(name))


def _on_self(node: ast.AST) -> bool:
    """``self._name`` or ``cls._name``: an object's own attribute, not one reached on another object."""
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}


def _class_attributes(node: ast.ClassDef) -> Iterator[str]:
    for statement in node.body:
        if isinstance(statement, ast.Assign):
            yield from (target.id for target in statement.targets if isinstance(target, ast.Name))
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            yield statement.target.id


@cache
def sdk_private_names(package: str) -> frozenset[str]:
    """The private attribute names the installed SDK package defines."""
    return defined_private_names(path.read_text(encoding="utf-8", errors="replace") for path in package_files(package))


def private_uses(source: str, sdk_names: dict[str, frozenset[str]], ours: frozenset[str]) -> list[Use]:
    """Uses in ``source`` of each SDK's private surface (``sdk_names``: package → the private names it defines).

    ``ours``: the private names the module's own package defines, never flagged; nor is anything
    reached on ``self`` or ``cls``.
    """
    uses: list[Use] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            uses.extend(_private_imports(node, sdk_names))
        elif isinstance(node, ast.Attribute) and not _on_self(node) and (sdks := _owners(node.attr, sdk_names, ours)):
            uses.append(Use(node.lineno, f".{node.attr}", sdks))
        elif isinstance(node, ast.Call) and (name := _by_name(node)) and (sdks := _owners(name, sdk_names, ours)):
            uses.append(Use(node.lineno, f'{node.func.id}(..., "{name}")', sdks))  # type: ignore[attr-defined]
    return sorted(uses, key=lambda use: (use.line, use.what))


def _by_name(call: ast.Call) -> str | None:
    """The attribute name of ``getattr(x, "_name", ...)`` and its kin, when ``x`` is not ``self``/``cls``."""
    if not (isinstance(call.func, ast.Name) and call.func.id in _BY_NAME and len(call.args) >= 2):
        return None
    target, name = call.args[0], call.args[1]
    if isinstance(target, ast.Name) and target.id in {"self", "cls"}:
        return None
    return name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None


def _owners(name: str, sdk_names: dict[str, frozenset[str]], ours: frozenset[str]) -> tuple[str, ...]:
    if not is_private(name) or name in ours:
        return ()
    return tuple(sdk for sdk, names in sdk_names.items() if name in names)


def _private_imports(node: ast.Import | ast.ImportFrom, sdk_names: dict[str, frozenset[str]]) -> Iterator[Use]:
    if isinstance(node, ast.Import):
        paths = [alias.name for alias in node.names]
    elif node.level == 0 and node.module:
        paths = [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return
    for path in paths:
        for sdk in sdk_names:
            inside = path[len(sdk) + 1 :].split(".") if path.startswith(f"{sdk}.") else []
            if any(is_private(part) for part in inside):
                yield Use(node.lineno, f"import {path}", (sdk,))


def module_path(module: str) -> Path | None:
    """The source file of one of the product's modules (``adapters.servicebus.settle``), found without importing it."""
    root, _, rest = module.partition(".")
    spec = importlib.util.find_spec(root)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest.split(".") if rest else [])
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def misplaced_uses(paths: dict[str, Path], allowed: dict[str, str]) -> list[tuple[str, Use]]:
    """Each use of an SDK's private surface (``allowed``: SDK package → its internals module) outside that module.

    ``paths``: module name → source file, for every module of the product; a module's own package
    (the files beside it) defines the private names that are its own.
    """
    sdk_names = {sdk: sdk_private_names(sdk) for sdk in allowed}
    sources = {module: path.read_text(encoding="utf-8") for module, path in paths.items()}
    found = []
    for module, source in sources.items():
        package = [sources[m] for m, path in paths.items() if path.parent == paths[module].parent]
        for use in private_uses(source, sdk_names, defined_private_names(package)):
            if module not in {allowed[sdk] for sdk in use.sdks}:
                found.append((module, use))
    return found


class SdkInternalsContract(Contract):
    """Each SDK's private surface is used only by its internals module (``sdk: module`` pairs in ``internals``)."""

    type_name = "sdk_internals"

    internals = fields.ListField(subfield=fields.StringField())

    def pairs(self) -> dict[str, str]:
        """SDK package → the one module allowed to touch its private surface."""
        pairs = (entry.split(":", 1) for entry in self.internals)  # type: ignore[attr-defined]
        return {sdk.strip(): module.strip() for sdk, module in pairs}

    def check(self, graph: object, verbose: bool) -> ContractCheck:
        """Read every module of the graph's root packages; list each private use outside its SDK's internals module."""
        allowed = self.pairs()
        modules = sorted(m for m in graph.modules if not graph.is_module_squashed(m))  # type: ignore[attr-defined]
        paths = {m: path for m in modules if (path := module_path(m)) is not None}
        empty = [sdk for sdk in allowed if not sdk_private_names(sdk)]
        found = misplaced_uses(paths, allowed)
        return ContractCheck(kept=not found and not empty, metadata={"uses": found, "empty": empty})

    def render_broken_contract(self, check: ContractCheck) -> None:
        """One line per private use, naming the module that may make it."""
        allowed = self.pairs()
        for sdk in check.metadata["empty"]:
            output.print_error(f"No private names found in the installed {sdk}: is it installed?", bold=False)
        for module, use in check.metadata["uses"]:
            owners = " or ".join(f"{allowed[sdk]} ({sdk})" for sdk in use.sdks)
            output.print_error(f"- {module}:{use.line} {use.what}: belongs in {owners}", bold=False)
        output.new_line()
