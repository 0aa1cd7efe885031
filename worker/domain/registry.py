"""The experiment model: validated experiments compiled for allocation, found by id.

Pure: this module builds a registry from a parsed document (``{"layers": [...], "holdouts": [...],
"experiments": [...]}``, from any source) or from validated models, and reads nothing. Reading the
experiments file (its size and kind, UTF-8, YAML without alias bombs) and reloading it when it
changes are the file adapter's (:mod:`adapters.experiments`), which the pump sees through the
:class:`~worker.service.ports.ExperimentSource` port; App Configuration could be another source.
The public ``ExperimentRegistry.load(path)`` is the composition root's
(:class:`worker.bootstrap.ExperimentRegistry`, exported as ``worker.ExperimentRegistry``): it joins
this model to that reader, so the domain imports no file or YAML code.

Every experiment is compiled by the allocation algebra (:func:`worker.domain.allocation.compile_file`,
``docs/allocation.md``): its walk of overrides, lifecycle, schedule, targeting, holdouts, layer and
coverage before the seed rule. An experiment that uses none of those is the seed rule alone.

Every problem names the source, the experiment (or layer, or holdout) and the field, and one load
lists all of them: field errors, duplicate ids, split problems and the whole-file allocation checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Self, TypeVar

from pydantic import JsonValue, ValidationError

from schemas.models import (
    MAX_ID_CHARS,
    MAX_SEGMENT_CHARS,
    ExperimentConfig,
    ExperimentFile,
    Holdout,
    Layer,
    effective_segment,
    request_context_problem,
)
from schemas.text import text_problem
from worker.domain.allocation import (
    AllocatedExperiment,
    AllocationFile,
    Explanation,
    Reason,
    compile_condition,
    compile_file,
)
from worker.domain.allocation import file_problems as allocation_problems
from worker.domain.assignment import VariantTable, validate_split
from worker.domain.errors import ConfigurationError, UnknownExperimentError


@dataclass(frozen=True, slots=True)
class Experiment:
    """A validated experiment: its splits compiled for lookups, and its allocation walk."""

    config: ExperimentConfig
    table: VariantTable
    segment_tables: Mapping[str, VariantTable]
    #: The compiled decision (``decide``/``explain``) and its ``config_version``.
    allocation: AllocatedExperiment

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

    @property
    def plain(self) -> bool:
        """True when the experiment uses no allocation step: every user is bucketed by the seed rule."""
        return len(self.allocation.steps) == 1


class Assignment(NamedTuple):
    """One user's assignment through the public API: what they are served, whether they count, and why.

    ``hash_value`` and ``threshold`` are the variant hash and the variant's ``[lower, upper)``, set only
    when ``reason`` is ``bucketed`` (``docs/allocation.md`` §2.3); ``config_version`` digests what
    decided it, ``experiment_version`` is the file's ``version``; ``at`` is the decision time (UTC).
    An immutable record, built once per call: a named tuple of these eleven fields is built in about
    a third of a frozen dataclass's time (0.3 us against 1 us), a fifth of a whole ``assign``.
    """

    experiment_id: str
    user_id: str
    segment: str | None
    variant_id: str
    in_experiment: bool
    reason: Reason
    hash_value: float | None
    threshold: tuple[float, float] | None
    experiment_version: str
    config_version: str
    at: datetime


class ExperimentRegistry:
    """An immutable set of experiments, looked up by id, with the allocation file they came from."""

    def __init__(self, experiments: Mapping[str, Experiment], allocation: AllocationFile) -> None:
        self._experiments = dict(experiments)
        #: The compiled file, for comparing a reload with it (:func:`worker.domain.allocation.changes`).
        self.allocation = allocation
        self.source = allocation.source

    def get(self, experiment_id: str) -> Experiment | None:
        """The experiment, or None when it is not configured."""
        return self._experiments.get(experiment_id)

    def __contains__(self, experiment_id: object) -> bool:
        return experiment_id in self._experiments

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self._experiments.values())

    def __len__(self) -> int:
        return len(self._experiments)

    def experiment(self, experiment_id: str) -> Experiment:
        """The experiment; :class:`UnknownExperimentError` listing the configured ones when it is not here."""
        found = self._experiments.get(experiment_id)
        if found is None:
            raise UnknownExperimentError(experiment_id, self.source, sorted(self._experiments))
        return found

    # -- the public API: assign and explain --------------------------------------------------------

    def assign(
        self,
        experiment_id: str,
        user_id: str,
        *,
        segment: str | None = None,
        context: Mapping[str, object] | None = None,
        at: datetime | None = None,
    ) -> Assignment:
        """Decide one user as the worker would decide their request (``docs/allocation.md`` §2.3).

        ``segment`` is the request's segment (else ``context["segment"]`` when that is a valid
        segment name); ``context`` is read by targeting and goes nowhere else; ``at`` is the decision
        time, timezone-aware (``None``: now, UTC). Raises :class:`UnknownExperimentError` for an
        experiment that is not configured, ``ValueError`` for an id, segment or context the wire
        contract refuses, or for a naive ``at``.
        """
        experiment, effective, read, when = self._prepare(experiment_id, user_id, segment, context, at)
        decision = experiment.allocation.decide(user_id, effective, read, when)
        return Assignment(
            experiment_id,
            user_id,
            effective,
            decision.variant_id,
            decision.in_experiment,
            decision.reason,
            decision.hash_value,
            decision.threshold,
            experiment.config.version,
            experiment.allocation.config_version,
            when,
        )

    def explain(
        self,
        experiment_id: str,
        user_id: str,
        *,
        segment: str | None = None,
        context: Mapping[str, object] | None = None,
        at: datetime | None = None,
    ) -> Explanation:
        """:meth:`assign`, recorded step by step: the same walk, never a second implementation.

        The explanation holds each step's hash input, value and threshold and, for targeting, which
        clause matched and the kind of the attribute: never a context value.
        """
        experiment, effective, read, when = self._prepare(experiment_id, user_id, segment, context, at)
        return experiment.allocation.explain(user_id, effective, read, when)

    def _prepare(
        self,
        experiment_id: str,
        user_id: str,
        segment: str | None,
        context: Mapping[str, object] | None,
        at: datetime | None,
    ) -> tuple[Experiment, str | None, dict[str, Any] | None, datetime]:
        experiment = self.experiment(experiment_id)
        problem = text_problem(user_id, MAX_ID_CHARS)
        if problem:
            raise ValueError(f"user_id {problem} (got {user_id!r:.80})")
        if segment is not None:
            problem = text_problem(segment, MAX_SEGMENT_CHARS)
            if problem:
                raise ValueError(f"segment {problem} (got {segment!r:.80})")
        read = None if context is None else _read_context(context)
        when = datetime.now(UTC) if at is None else at
        if when.tzinfo is None:
            raise ValueError("at must be timezone-aware (UTC); got a naive datetime")
        return experiment, effective_segment(segment, read), read, when

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, file: ExperimentFile, source: str = "<memory>") -> Self:
        """Compile a validated file; raises :class:`ConfigurationError` listing every problem of it."""
        allocation = compile_file(file, source)
        experiments = {
            experiment_id: _experiment(allocation.configs[experiment_id], allocated)
            for experiment_id, allocated in allocation.experiments.items()
        }
        return cls(experiments, allocation)

    @classmethod
    def from_configs(cls, configs: list[ExperimentConfig], source: str = "<memory>") -> Self:
        """Compile validated experiments (no layers or holdouts); raises :class:`ConfigurationError`."""
        return cls.from_file(ExperimentFile.model_construct(layers=[], holdouts=[], experiments=list(configs)), source)

    @classmethod
    def from_dict(cls, data: object, source: str = "<memory>") -> Self:
        """Validate a parsed registry document; ``source`` names it in errors, which list every problem."""
        try:
            parsed = ExperimentFile.model_validate(data)
        except ValidationError as exc:
            problems = [_describe_validation(exc, data, source), *_problems_beyond_fields(data, source)]
            raise ConfigurationError("\n".join(problems)) from None
        return cls.from_file(parsed, source)

    @classmethod
    def single(
        cls,
        experiment_id: str,
        split: Mapping[str, float],
        seed: str = "echovoice",
        version: str = "1",
    ) -> Self:
        """A registry of one experiment, for the command line's ``--split``/``--seed``."""
        try:
            config = ExperimentConfig(id=experiment_id, split=dict(split), seed=seed, version=version)
        except ValidationError as exc:
            raise ConfigurationError(_describe_validation(exc, {}, "--split")) from None
        return cls.from_configs([config], "--split")


def _experiment(config: ExperimentConfig, allocated: AllocatedExperiment) -> Experiment:
    # compile_file has validated every split already: these cannot raise.
    tables = {segment: VariantTable(validate_split(split)) for segment, split in config.segments.items()}
    return Experiment(config, VariantTable(validate_split(config.split)), tables, allocated)


_Group = TypeVar("_Group", Layer, Holdout)


def _problems_beyond_fields(data: object, source: str) -> list[str]:
    """Duplicate ids, split problems and whole-file allocation problems of a file with field errors.

    The parts that validate are compiled together, so one run lists every problem. A layer or
    holdout whose own fields are wrong still stands in for its id, so experiments naming it are not
    also reported as naming an unknown one.
    """
    document = data if isinstance(data, dict) else {}
    layers = _valid_or_placeholder(
        document.get("layers"), Layer, lambda layer_id: Layer.model_construct(id=layer_id, salt=None)
    )
    holdouts = _valid_or_placeholder(
        document.get("holdouts"),
        Holdout,
        lambda holdout_id: Holdout.model_construct(id=holdout_id, salt=None, share=0.0),
    )
    problems: list[str] = []
    configs: list[ExperimentConfig] = []
    seen: set[str] = set()
    items = document.get("experiments")
    for index, item in enumerate(items if isinstance(items, list) else []):
        experiment_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(experiment_id, str):
            if experiment_id in seen:
                problems.append(f"{source}: experiment {experiment_id!r}: duplicate id")
                continue
            seen.add(experiment_id)
        try:
            configs.append(ExperimentConfig.model_validate(item))
        except ValidationError as exc:  # its field errors are already listed; its targeting may add more
            where = f"{source}: experiment {_item_label(document, 'experiments', index)}"
            problems += _targeting_problems(item, exc, where)
    partial = ExperimentFile.model_construct(layers=layers, holdouts=holdouts, experiments=configs)
    return problems + allocation_problems(partial, source)


def _targeting_problems(item: object, exc: ValidationError, where: str) -> list[str]:
    """The condition problems of an experiment whose other fields failed: a condition compiles alone.

    Only when ``targeting`` is an object the model took (else its field error says it all); the
    checks that read several fields (control, overrides and launched against the split, layers,
    holdouts, times) wait until the fields they read are valid.
    """
    raw = item.get("targeting") if isinstance(item, dict) else None
    if not isinstance(raw, dict) or any(error["loc"][:1] == ("targeting",) for error in exc.errors()):
        return []
    _, found = compile_condition(raw)
    return [f"{where}: field '{problem.path}': {problem.message}" for problem in found]


def _valid_or_placeholder(items: object, model: type[_Group], placeholder: Callable[[str], _Group]) -> list[_Group]:
    found: list[_Group] = []
    for item in items if isinstance(items, list) else []:
        try:
            found.append(model.model_validate(item))
        except ValidationError:
            identifier = item.get("id") if isinstance(item, dict) else None
            if isinstance(identifier, str):
                found.append(placeholder(identifier))
    return found


def _describe_validation(exc: ValidationError, data: object, source: str) -> str:
    """One line per problem: file, experiment (or layer, holdout) by id when readable, field path, message."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        where = source
        if len(loc) >= 2 and loc[0] in _GROUPS and isinstance(loc[1], int):
            where += f": {_GROUPS[str(loc[0])]} {_item_label(data, str(loc[0]), loc[1])}"
            loc = loc[2:]
        path = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; unknown keys are not allowed)"
        lines.append(f"{where}: field '{path}': {message}")
    return "\n".join(lines)


#: Top-level lists of the file, and what one item of each is called in an error.
_GROUPS = {"experiments": "experiment", "layers": "layer", "holdouts": "holdout"}


def _item_label(data: Any, group: str, index: int) -> str:
    # Any: any document at all, read by trying (a failed lookup is an unlabelled item), not by type.
    try:
        identifier = data[group][index]["id"]
    except (KeyError, IndexError, TypeError):
        return f"#{index + 1}"
    return repr(identifier) if isinstance(identifier, str) else f"#{index + 1}"


def _read_context(context: object) -> dict[str, Any]:
    """The caller's context as a plain dict, read once, within the wire contract's limits; else ValueError.

    Read once at the API's boundary: a caller's Mapping may raise from any method (the error would
    otherwise escape from deep inside the decision) or answer differently on each read (the segment
    and targeting would then see different contexts). A context the worker would dead-letter (too
    many keys, too long a string, too deep) is refused as the worker refuses it.
    """
    # type() before isinstance(): a plain dict, the common case, skips the ABC check.
    if type(context) is not dict and not isinstance(context, Mapping):
        raise ValueError(f"context must be a mapping (a JSON object) or None, got {type(context).__name__}")
    try:
        read = dict(context.items())
    except Exception as exc:  # any error of the caller's Mapping is one clear refusal
        raise ValueError(f"context could not be read as a mapping: {type(exc).__name__}") from exc
    odd = next((key for key in read if type(key) is not str), None)
    if odd is not None:
        raise ValueError(f"context keys must be strings, got {type(odd).__name__}")
    problem = request_context_problem(read)
    if problem:
        raise ValueError(f"context {problem}")
    return read
