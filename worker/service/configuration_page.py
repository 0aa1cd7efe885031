"""The manual's configuration page, generated from :class:`WorkerSettings`: ``make docs``.

``python -m worker.service.configuration_page`` prints ``docs/configuration.md``: one row per field,
with its environment variable, default, accepted values and description. A test fails when the
committed page differs from what this prints, so the page cannot drift from the model.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Iterator

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from worker.service.settings import WorkerSettings

INTRO = """\
# Configuration

<!-- Generated from worker/service/settings.py by `make docs`; edit the field descriptions there. -->

Every setting of `ab-worker run` is an environment variable, named in the table (case-insensitive);
command-line flags override them. An empty variable counts as unset. Secrets are never logged,
printed or sent as telemetry. A value the table does not accept is an error naming the variable
(exit status 2), before anything connects.

| variable | default | accepts | meaning |
|---|---|---|---|
"""


def variables(name: str, field: FieldInfo) -> list[str]:
    """The environment variables that set field ``name``: its aliases, else ``AB_WORKER_<NAME>``."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{WorkerSettings.model_config.get('env_prefix', '')}{name}".upper()]


def default(field: FieldInfo) -> str:
    """The default as an operator would write it, or ``—`` when there is none."""
    if field.default_factory is not None:
        return "empty"
    if field.default is None or field.default is PydanticUndefined:
        return "—"
    return f"`{field.default}`"


def accepts(field: FieldInfo) -> str:
    """The values the model accepts: the choices of a ``Literal``, or a number's bounds."""
    choices = _literal_choices(field.annotation)
    if choices:
        return ", ".join(f"`{choice}`" for choice in choices)
    bounds = list(_bounds(field))
    kind = _kind(field.annotation)
    return f"{kind} {', '.join(bounds)}" if bounds else kind


def _literal_choices(annotation: object) -> tuple[object, ...]:
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def _kind(annotation: object) -> str:
    names = {"int": "integer", "float": "number", "SecretStr": "secret", "list": "list", "str": "text"}
    text = str(annotation)
    return next((label for name, label in names.items() if name in text), "text")


def _bounds(field: FieldInfo) -> Iterator[str]:
    symbols = {Gt: ("> ", "gt"), Ge: ("≥ ", "ge"), Lt: ("< ", "lt"), Le: ("≤ ", "le")}
    for constraint in field.metadata:
        for kind, (symbol, attribute) in symbols.items():
            if isinstance(constraint, kind):
                yield f"{symbol}{getattr(constraint, attribute):,}"
        if isinstance(constraint, MinLen) and constraint.min_length:
            yield "not empty"


def row(name: str, field: FieldInfo) -> str:
    """One table row: variables, default, accepted values, description."""
    names = " or ".join(f"`{variable}`" for variable in variables(name, field))
    meaning = (field.description or "").replace("|", "\\|")
    return f"| {names} | {default(field)} | {accepts(field)} | {meaning} |"


def render() -> str:
    """The whole page, as committed in ``docs/configuration.md``."""
    rows = [row(name, field) for name, field in WorkerSettings.model_fields.items()]
    return INTRO + "\n".join(rows) + "\n"


def main() -> int:
    """Print the page (``make docs`` writes it to ``docs/configuration.md``)."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
