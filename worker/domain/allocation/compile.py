"""Whole-file validation and compilation (``docs/allocation.md`` §2.2, §2.4, §2.8, §2.10).

:func:`compile_file` takes a parsed :class:`ExperimentFile` and returns every experiment compiled
for allocation, or raises :class:`ConfigurationError` listing every problem of the file at once, one
line each naming the file, the experiment (or layer, or holdout) and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from schemas.instants import format_instant, instant_of_datetime
from schemas.models import ExperimentConfig, ExperimentFile, Holdout, Layer
from worker.domain.allocation.canonical import canonical_json, sha256_prefix
from worker.domain.allocation.conditions import CompiledCondition, compile_condition
from worker.domain.allocation.experiment import (
    AllocatedExperiment,
    BucketStep,
    CoverageStep,
    Decision,
    DigestDocument,
    HoldoutStep,
    LayerStep,
    OverrideStep,
    Reason,
    ScheduleStep,
    StatusStep,
    Step,
    TargetingStep,
)
from worker.domain.assignment import VariantTable, validate_split
from worker.domain.errors import ConfigurationError, SplitRatioError

#: The allocation contract's version, part of every ``config_version`` digest.
CONTRACT = "allocation/1"
#: Statuses whose experiments hold their layer range (§2.4).
HOLDING_STATUSES = frozenset({"draft", "running"})
_Group = TypeVar("_Group", Layer, Holdout)


@dataclass(frozen=True, slots=True)
class AllocationFile:
    """Every experiment of one file, compiled. Look one up with ``file.experiments[experiment_id]``."""

    source: str
    experiments: Mapping[str, AllocatedExperiment]
    configs: Mapping[str, ExperimentConfig]

    def __iter__(self) -> Iterator[AllocatedExperiment]:
        return iter(self.experiments.values())


def default_control(split: Mapping[str, float]) -> str:
    """``control`` when the split has it, else the first variant id in sorted (code-point) order."""
    return "control" if "control" in split else min(split)


def compile_file(file: ExperimentFile, source: str = "<memory>") -> AllocationFile:
    """Compile every experiment; raises :class:`ConfigurationError` listing every problem of the file."""
    problems: list[str] = []
    layers = _unique(file.layers, "layer", source, problems)
    holdouts = _unique(file.holdouts, "holdout", source, problems)
    for holdout in file.holdouts:
        if not 0.0 <= holdout.share <= 1.0:
            problems.append(
                f"{source}: holdout {holdout.id!r}: field 'share': must be in [0, 1], got {holdout.share!r}"
            )
    experiments: dict[str, AllocatedExperiment] = {}
    configs: dict[str, ExperimentConfig] = {}
    for config in file.experiments:
        if config.id in configs:
            problems.append(f"{source}: experiment {config.id!r}: duplicate id")
            continue
        configs[config.id] = config
        compiled = compile_experiment(config, layers, holdouts, f"{source}: experiment {config.id!r}", problems)
        if compiled is not None:
            experiments[config.id] = compiled
    problems.extend(_layer_overlaps(configs.values(), source))
    if problems:
        raise ConfigurationError("\n".join(problems))
    return AllocationFile(source, experiments, configs)


def file_problems(file: ExperimentFile, source: str = "<memory>") -> list[str]:
    """Every problem :func:`compile_file` would raise for, as lines (empty when the file is valid)."""
    try:
        compile_file(file, source)
    except ConfigurationError as exc:
        return str(exc).splitlines()
    return []


def _unique(items: list[_Group], kind: str, source: str, problems: list[str]) -> dict[str, _Group]:
    found: dict[str, _Group] = {}
    for item in items:
        if item.id in found:
            problems.append(f"{source}: {kind} {item.id!r}: duplicate id")
            continue
        found[item.id] = item
    return found


def _tables(
    config: ExperimentConfig, where: str, problems: list[str]
) -> tuple[VariantTable, dict[str, VariantTable]] | None:
    """The split and segment splits compiled, with today's registry checks and messages."""
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
    return table, segment_tables


def compile_experiment(
    config: ExperimentConfig,
    layers: Mapping[str, Layer],
    holdouts: Mapping[str, Holdout],
    where: str,
    problems: list[str],
) -> AllocatedExperiment | None:
    """One experiment's walk, or ``None`` with its problems appended (each prefixed by ``where``)."""
    before = len(problems)
    tables = _tables(config, where, problems)
    variants = set(config.split)
    control = config.control if config.control is not None else default_control(config.split) if config.split else ""
    if config.control is not None and config.control not in variants:
        problems.append(
            f"{where}: field 'control': {config.control!r} is not a variant of the split {sorted(variants)}"
        )
    _check_lifecycle(config, variants, where, problems)
    if not 0.0 <= config.coverage <= 1.0:
        problems.append(f"{where}: field 'coverage': must be in [0, 1], got {config.coverage!r}")
    layer = _check_layer(config, layers, where, problems)
    listed = _check_holdouts(config, holdouts, where, problems)
    for user, variant in config.overrides.items():
        if variant not in variants:
            problems.append(
                f"{where}: field 'overrides.{user}': {variant!r} is not a variant of the split {sorted(variants)}"
            )
    condition = None
    if config.targeting:
        condition, condition_problems = compile_condition(config.targeting)
        problems.extend(f"{where}: field '{problem.path}': {problem.message}" for problem in condition_problems)
    if len(problems) > before or tables is None:
        return None
    parts = _Checked(control, tables, layer, listed, condition)
    steps, absent = _steps(config, parts)
    document = digest_document(config, parts)
    digest = sha256_prefix(canonical_json(document))
    return AllocatedExperiment(config.id, config.version, control, digest, steps, absent, document)


def _check_lifecycle(config: ExperimentConfig, variants: set[str], where: str, problems: list[str]) -> None:
    if config.status == "launched" and config.launched is None:
        problems.append(f"{where}: field 'launched': status launched needs the variant everyone gets in 'launched'")
    if config.launched is not None and config.status != "launched":
        problems.append(
            f"{where}: field 'launched': set only with status launched (status is {config.status}); remove it or launch"
        )
    if config.launched is not None and config.launched not in variants:
        problems.append(
            f"{where}: field 'launched': {config.launched!r} is not a variant of the split {sorted(variants)}"
        )
    if config.start_at is not None and config.end_at is not None and not config.end_at > config.start_at:
        problems.append(
            f"{where}: field 'end_at': must be later than start_at ({_time(config.end_at)} is not after "
            f"{_time(config.start_at)})"
        )


def _check_layer(
    config: ExperimentConfig, layers: Mapping[str, Layer], where: str, problems: list[str]
) -> tuple[str, str, float, float] | None:
    """``(layer id, effective salt, lo, hi)`` of the experiment's slice, or ``None``."""
    if config.layer is None:
        return None
    low, high = config.layer.range
    if not 0.0 <= low < high <= 1.0:
        problems.append(
            f"{where}: field 'layer.range': must be [lo, hi] with 0 <= lo < hi <= 1, got [{low!r}, {high!r}]"
        )
    declared = layers.get(config.layer.id)
    if declared is None:
        problems.append(f"{where}: field 'layer.id': unknown layer {config.layer.id!r}; declared: {sorted(layers)}")
        return None
    return declared.id, declared.salt or declared.id, low, high


def _check_holdouts(
    config: ExperimentConfig, holdouts: Mapping[str, Holdout], where: str, problems: list[str]
) -> list[tuple[str, str, float]]:
    """``(holdout id, effective salt, share)`` for each listed holdout, in listed order."""
    listed: list[tuple[str, str, float]] = []
    seen: set[str] = set()
    for index, holdout_id in enumerate(config.holdouts):
        if holdout_id in seen:
            problems.append(f"{where}: field 'holdouts.{index}': {holdout_id!r} is listed twice")
            continue
        seen.add(holdout_id)
        declared = holdouts.get(holdout_id)
        if declared is None:
            problems.append(
                f"{where}: field 'holdouts.{index}': unknown holdout {holdout_id!r}; declared: {sorted(holdouts)}"
            )
            continue
        listed.append((declared.id, declared.salt or declared.id, declared.share))
    return listed


def _layer_overlaps(configs: Iterable[ExperimentConfig], source: str) -> list[str]:
    """Two draft or running experiments in one layer whose ranges overlap (``lo1 < hi2 and lo2 < hi1``)."""
    problems = []
    placed: dict[str, list[tuple[str, float, float]]] = {}
    for config in configs:
        if config.layer is None or config.status not in HOLDING_STATUSES:
            continue
        low, high = config.layer.range
        for other, other_low, other_high in placed.get(config.layer.id, []):
            if low < other_high and other_low < high:
                problems.append(
                    f"{source}: experiment {config.id!r}: field 'layer.range': [{low!r}, {high!r}) overlaps "
                    f"[{other_low!r}, {other_high!r}) of experiment {other!r} in layer {config.layer.id!r}; "
                    "experiments in one layer must not share users"
                )
        placed.setdefault(config.layer.id, []).append((config.id, low, high))
    return problems


@dataclass(frozen=True, slots=True)
class _Checked:
    """An experiment's parts once checked: what its steps and its digest are built from."""

    control: str
    tables: tuple[VariantTable, dict[str, VariantTable]]
    #: (layer id, effective salt, lo, hi), or None.
    layer: tuple[str, str, float, float] | None
    #: (holdout id, effective salt, share) per listed holdout, in listed order.
    holdouts: list[tuple[str, str, float]]
    condition: CompiledCondition | None


def _steps(config: ExperimentConfig, parts: _Checked) -> tuple[tuple[Step, ...], dict[str, str]]:
    """The walk of §2.3 with only the steps this experiment uses, and why each other one is absent."""
    control, layer = parts.control, parts.layer
    live = config.status in HOLDING_STATUSES
    served = config.launched if config.status == "launched" and config.launched else control
    status = None if config.status == "running" else Reason(config.status)
    scheduled = config.start_at is not None or config.end_at is not None
    candidates: list[tuple[str, Step | None, str]] = [
        (
            "override",
            OverrideStep(config.overrides) if config.overrides and live else None,
            "overrides apply only in draft or running" if config.overrides else "no overrides",
        ),
        ("status", StatusStep(config.status, Decision(served, False, status)) if status else None, "status running"),
        (
            "schedule",
            ScheduleStep(config.start_at, config.end_at, control) if scheduled else None,
            "no start_at or end_at",
        ),
        (
            "targeting",
            TargetingStep(parts.condition, control) if parts.condition else None,
            "no targeting: everyone",
        ),
        ("holdout", HoldoutStep(parts.holdouts, control) if parts.holdouts else None, "no holdouts"),
        ("layer", LayerStep(*layer, control) if layer else None, "no layer"),
        (
            "coverage",
            CoverageStep(config.seed, config.id, config.coverage, control) if config.coverage < 1.0 else None,
            "coverage 1: every eligible user",
        ),
    ]
    steps = [step for _, step, _ in candidates if step is not None]
    steps.append(BucketStep(config.seed, config.id, *parts.tables))
    return tuple(steps), {name: why for name, step, why in candidates if step is None}


def _time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    micros = instant_of_datetime(moment)
    return None if micros is None else format_instant(micros)


def digest_document(config: ExperimentConfig, parts: _Checked) -> DigestDocument:
    """``D`` of §2.8: everything that decides the experiment's assignments, effective values filled in."""
    layer, condition = parts.layer, parts.condition
    return {
        "contract": CONTRACT,
        "experiment_id": config.id,
        "seed": config.seed,
        "split": dict(config.split),
        "segments": {segment: dict(split) for segment, split in config.segments.items()},
        "control": parts.control,
        "status": config.status,
        "launched": config.launched,
        "start_at": _time(config.start_at),
        "end_at": _time(config.end_at),
        "coverage": config.coverage,
        "layer": None if layer is None else {"id": layer[0], "salt": layer[1], "range": [layer[2], layer[3]]},
        "holdouts": [{"id": hid, "salt": salt, "share": share} for hid, salt, share in sorted(parts.holdouts)],
        "targeting": condition.canonical if condition is not None and condition.canonical else None,
        "overrides": dict(config.overrides),
    }
