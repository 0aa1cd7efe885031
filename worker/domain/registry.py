"""The experiment model: validated experiments, their splits compiled for lookups, found by id.

Pure: this module builds a registry from a parsed document (``{"experiments": [...]}``, from any
source) or from validated configs, and reads nothing. Reading the experiments file (its size and
kind, UTF-8, YAML without alias bombs) and reloading it when it changes are the file adapter's
(:mod:`adapters.experiments`), which the pump sees through the
:class:`~worker.service.ports.ExperimentSource` port; App Configuration could be another source.
The public ``ExperimentRegistry.load(path)`` is the composition root's
(:class:`worker.bootstrap.ExperimentRegistry`, exported as ``worker.ExperimentRegistry``): it joins
this model to that reader, so the domain imports no file or YAML code.

Every problem names the source, the experiment and the field, and one load lists all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from pydantic import JsonValue, ValidationError

from schemas.models import ExperimentConfig, ExperimentFile
from worker.domain.assignment import VariantTable, validate_split
from worker.domain.errors import ConfigurationError, SplitRatioError


@dataclass(frozen=True, slots=True)
class Experiment:
    """A validated experiment with its splits compiled for lookups."""

    config: ExperimentConfig
    table: VariantTable
    segment_tables: Mapping[str, VariantTable] = field(default_factory=dict)

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


class ExperimentRegistry:
    """An immutable set of experiments, looked up by id."""

    def __init__(self, experiments: Mapping[str, Experiment], source: str = "<memory>") -> None:
        self._experiments = dict(experiments)
        self.source = source

    def get(self, experiment_id: str) -> Experiment | None:
        """The experiment, or None when it is not configured."""
        return self._experiments.get(experiment_id)

    def __contains__(self, experiment_id: object) -> bool:
        return experiment_id in self._experiments

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self._experiments.values())

    def __len__(self) -> int:
        return len(self._experiments)

    @classmethod
    def from_configs(cls, configs: list[ExperimentConfig], source: str = "<memory>") -> Self:
        """Compile validated configs; raises :class:`ConfigurationError` naming source and experiment."""
        problems: list[str] = []
        experiments: dict[str, Experiment] = {}
        for config in configs:
            if config.id in experiments:
                problems.append(f"{source}: experiment {config.id!r}: duplicate id")
                continue
            compiled = _compile(config, source, problems)
            if compiled is not None:
                experiments[config.id] = compiled
        if problems:
            raise ConfigurationError("\n".join(problems))
        return cls(experiments, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> Self:
        """Validate a parsed registry document (``{"experiments": [...]}``); ``source`` names it in errors."""
        try:
            parsed = ExperimentFile.model_validate(data)
        except ValidationError as exc:
            problems = [_describe_validation(exc, data, source), *_problems_beyond_fields(data, source)]
            raise ConfigurationError("\n".join(problems)) from None
        return cls.from_configs(parsed.experiments, source)

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


def _problems_beyond_fields(data: Any, source: str) -> list[str]:
    """Duplicate ids and split problems of a file that also has field errors, so one run lists all."""
    items = data.get("experiments") if isinstance(data, dict) else None
    problems: list[str] = []
    seen: set[str] = set()
    for item in items if isinstance(items, list) else []:
        experiment_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(experiment_id, str):
            if experiment_id in seen:
                problems.append(f"{source}: experiment {experiment_id!r}: duplicate id")
                continue
            seen.add(experiment_id)
        try:
            config = ExperimentConfig.model_validate(item)
        except ValidationError:
            continue  # its field errors are already listed
        _compile(config, source, problems)
    return problems


def _compile(config: ExperimentConfig, source: str, problems: list[str]) -> Experiment | None:
    where = f"{source}: experiment {config.id!r}"
    try:
        table = VariantTable(validate_split(config.split))
    except SplitRatioError as exc:
        problems.append(f"{where}: field 'split': {exc}")
        return None
    unknown = sorted(set(config.variants) - set(config.split))
    if unknown:
        problems.append(f"{where}: field 'variants': metadata for variants not in the split: {unknown}")
    segment_tables: dict[str, VariantTable] = {}
    for segment, split in config.segments.items():
        try:
            segment_tables[segment] = VariantTable(validate_split(split))
        except SplitRatioError as exc:
            problems.append(f"{where}: field 'segments.{segment}': {exc}")
            continue
        extra = sorted(set(split) - set(config.split))
        if extra:
            problems.append(f"{where}: field 'segments.{segment}': variants not in the experiment's split: {extra}")
    return Experiment(config, table, segment_tables)


def _describe_validation(exc: ValidationError, data: Any, source: str) -> str:
    """One line per problem: file, experiment (by id when readable), field path, message."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        where = source
        if len(loc) >= 2 and loc[0] == "experiments" and isinstance(loc[1], int):
            where += f": experiment {_experiment_label(data, loc[1])}"
            loc = loc[2:]
        path = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; unknown keys are not allowed)"
        lines.append(f"{where}: field '{path}': {message}")
    return "\n".join(lines)


def _experiment_label(data: Any, index: int) -> str:
    try:
        experiment_id = data["experiments"][index]["id"]
    except (KeyError, IndexError, TypeError):
        return f"#{index + 1}"
    return repr(experiment_id) if isinstance(experiment_id, str) else f"#{index + 1}"
