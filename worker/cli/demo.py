"""The demo a newcomer sees from ``make run``: realistic requests, and a summary of what happened."""

from __future__ import annotations

import json
import random
import shlex
from collections import Counter
from pathlib import Path

from worker.cli.common import activation_hint, runnable_program
from worker.domain.plural import counted
from worker.domain.registry import Experiment, ExperimentRegistry
from worker.domain.srm.format import format_p
from worker.domain.srm.stats import StatsInputError, srm_test

CAMPAIGNS = ("winter_2026", "spring_launch", "retention_q1")
#: What the demo's allocation requests carry for the targeting of ``deploy/experiments.yaml``
#: (``country`` in US/CA, ``app_version`` 5.2.0 or later): some match, some do not, some lack a key.
COUNTRIES = ("US", "US", "US", "US", "CA", "CA", "GB", None)
APP_VERSIONS = ("5.1.0", "5.2.0", "5.2.3", "5.10.1", "6.0.0-beta.1", "6.1", "6.1", None)
#: Requests for the experiments that use allocation fields, after the ones for the plain experiments.
ALLOCATION_REQUESTS = 600


def demo_requests(registry: ExperimentRegistry, count: int = 500, seed: int = 2026) -> list[bytes]:
    """Realistic requests over the registry's experiments, then :data:`POISONED` poisoned ones.

    ``count`` requests go to the experiments that use no allocation field, drawn exactly as before
    allocation existed, so the numbers the README quotes for them (``exp_001``'s 40.7%/59.3%) stay
    put; then :data:`ALLOCATION_REQUESTS` go to the experiments that do, with the ``country`` and
    ``app_version`` their targeting reads and one request per QA override. Contexts carry an e-mail
    address on purpose: the demo shows it never leaves the worker.
    """
    rng = random.Random(seed)
    plain = [experiment for experiment in registry if experiment.plain]
    bodies: list[bytes] = []
    for index in range(count if plain else 0):
        experiment = rng.choice(plain)
        body: dict[str, object] = {
            "user_id": f"U{100000 + rng.randrange(50000)}",
            "experiment_id": experiment.id,
            "request_id": f"demo-{index:05d}",
            "context": {"campaign": rng.choice(CAMPAIGNS), "email": f"person{index}@example.com"},
        }
        if experiment.config.segments:
            body["segment"] = rng.choice([*experiment.config.segments, "standard"])
        bodies.append(json.dumps(body).encode())
    bodies += _allocation_requests([experiment for experiment in registry if not experiment.plain], seed)
    return bodies + _poisoned()


def _allocation_requests(experiments: list[Experiment], seed: int) -> list[bytes]:
    """Requests for the experiments with allocation fields: targeting contexts, and their QA overrides."""
    if not experiments:
        return []
    rng = random.Random(seed + 1)  # a stream of its own: the plain experiments' requests stay as they were
    bodies: list[bytes] = []
    for index in range(ALLOCATION_REQUESTS):
        experiment = experiments[index % len(experiments)]
        context: dict[str, object] = {"campaign": rng.choice(CAMPAIGNS), "email": f"shopper{index}@example.com"}
        for key, values in (("country", COUNTRIES), ("app_version", APP_VERSIONS)):
            value = rng.choice(values)
            if value is not None:
                context[key] = value
        body = {
            "user_id": f"U{200000 + rng.randrange(50000)}",
            "experiment_id": experiment.id,
            "request_id": f"demo-allocation-{index:05d}",
            "context": context,
        }
        bodies.append(json.dumps(body).encode())
    for experiment in experiments:
        for user in experiment.config.overrides:
            body = {"user_id": user, "experiment_id": experiment.id, "request_id": f"demo-qa-{experiment.id}"}
            bodies.append(json.dumps(body).encode())
    return bodies


def _poisoned() -> list[bytes]:
    return [
        b"{this is not json",
        json.dumps({"user_id": "U1", "experiment_id": "exp_not_configured_yet"}).encode(),
        json.dumps({"experiment_id": "exp_001"}).encode(),
        json.dumps({"user_id": 42, "experiment_id": "exp_001"}).encode(),
    ]


#: How many of the demo's requests are deliberately malformed or for an unknown experiment.
POISONED = len(_poisoned())


def summary_table(
    assignments: Counter[tuple[str, str]],
    dead_letters: Counter[str],
    registry: ExperimentRegistry,
    outside: Counter[tuple[str, str]] | None = None,
) -> str:
    """Per experiment and variant: users in the experiment, their share beside the target, and the SRM p-value;
    then the users served outside it (``outside``, by reason).

    The p-value is the sample-ratio-mismatch test of the in-experiment counts against the split (p <
    0.001 is a mismatch), so a 40%/60% result on a 50/50 split reads as chance or as a problem, not as
    a guess. Users outside the experiment (an override, a holdout, another layer slice, not ramped
    yet, not targeted…) are served a variant but never counted, as in every report. Experiments with
    per-segment splits have no single target, so they show none.
    """
    lines = [f"{'experiment':<28}{'variant':<16}{'count':>7}{'share':>8}{'target':>8}  SRM check"]
    by_experiment: dict[str, dict[str, int]] = {}
    for (experiment_id, variant), n in sorted(assignments.items()):
        by_experiment.setdefault(experiment_id, {})[variant] = n
    not_in: dict[str, dict[str, int]] = {}
    for (experiment_id, reason), n in sorted((outside or Counter()).items()):
        not_in.setdefault(experiment_id, {})[reason] = n
    for experiment_id in sorted(set(by_experiment) | set(not_in)):
        counts = by_experiment.get(experiment_id, {})
        experiment = registry.get(experiment_id)
        split = experiment.config.split if experiment is not None and not experiment.config.segments else None
        verdict = _srm_verdict(counts, split) if split else "split varies by segment"
        total = sum(counts.values())
        for index, (variant, n) in enumerate(counts.items()):
            target = f"{split.get(variant, 0.0):>8.1%}" if split else f"{'-':>8}"
            tail = f"  {verdict}" if index == 0 else ""
            lines.append(f"{experiment_id if index == 0 else '':<28}{variant:<16}{n:>7}{n / total:>8.1%}{target}{tail}")
        if experiment_id in not_in:
            reasons = not_in[experiment_id]
            detail = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda item: -item[1]))
            label = "" if counts else experiment_id
            lines.append(f"{label:<28}{'not in it':<16}{sum(reasons.values()):>7}  served, not counted: {detail}")
    if not_in:
        lines.append("")
        lines.append("count: users in the experiment (what results and the SRM check count); 'not in it': users")
        lines.append("served the control, an override or the launched variant, by the step that decided")
    if dead_letters:
        lines.append("")
        lines.append("dead-lettered:")
        lines.extend(f"  {reason:<26}{n:>7}" for reason, n in sorted(dead_letters.items()))
    return "\n".join(lines)


def _srm_verdict(counts: dict[str, int], split: dict[str, float]) -> str:
    observed = {variant: counts.get(variant, 0) for variant in split}
    try:
        result = srm_test(observed, split)
    except StatsInputError as exc:
        return f"not tested ({exc})"
    if result.flagged:
        return f"SRM! {format_p(result.p_value)}: not the configured split"
    return f"{format_p(result.p_value)}: no mismatch (SRM is p < 0.001)"


def next_steps(rows: str | None, dead_letters: str | None, dead: int, *, broker_kept: bool) -> str:
    """What to run after the demo, each line runnable as printed in this shell (``ab-worker`` or its path).

    ``broker_kept``: the demo ran on a broker that stays up (``make broker``), so the dead-letter
    commands have something to talk to; after ``--local`` they would not, and the text says how to keep one.
    """
    program = runnable_program()
    on_path = program == "ab-worker"
    hint = activation_hint()
    lines = ["", "next steps:" if on_path or hint is None else f"next steps (`{hint}` puts ab-worker on your PATH):"]
    if rows:
        report = f"{program} report --rows {shlex.quote(rows)}"
        html = shlex.quote(str(Path(rows).with_name("report.html")))
        dead_letter_panel = f" --dead-letters {shlex.quote(dead_letters)}" if dead_letters else ""
        lines += [f"  {report}", f"  {report} --html {html}{dead_letter_panel}"]
    if broker_kept:
        lines += [f"  {program} dlq peek --summary", f"  {program} dlq replay --reason UnknownExperiment --dry-run"]
        return "\n".join(lines)
    lines += [
        "",
        f"The embedded broker stopped with this run, and its {counted(dead, 'dead letter')} with it. To keep a broker",
        "for `ab-worker dlq peek` and `dlq replay`: run `make broker` in another terminal, paste here the",
        "lines it prints, then `make run` again (or this command without --local).",
    ]
    return "\n".join(lines)
