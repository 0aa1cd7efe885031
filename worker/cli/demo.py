"""The demo a newcomer sees from ``make run``: realistic requests, and a summary of what happened."""

from __future__ import annotations

import json
import random
import shlex
from collections import Counter
from pathlib import Path

from worker.cli.common import activation_hint, runnable_program
from worker.domain.plural import counted
from worker.domain.registry import ExperimentRegistry
from worker.domain.srm.format import format_p
from worker.domain.srm.stats import StatsInputError, srm_test

CAMPAIGNS = ("winter_2026", "spring_launch", "retention_q1")


def demo_requests(registry: ExperimentRegistry, count: int = 500, seed: int = 2026) -> list[bytes]:
    """``count`` realistic requests over the registry's experiments, plus a few poisoned ones.

    Contexts carry an e-mail address on purpose: the demo shows it never leaves the worker.
    """
    rng = random.Random(seed)
    experiments = list(registry)
    bodies: list[bytes] = []
    for index in range(count):
        experiment = rng.choice(experiments)
        body: dict[str, object] = {
            "user_id": f"U{100000 + rng.randrange(50000)}",
            "experiment_id": experiment.id,
            "request_id": f"demo-{index:05d}",
            "context": {"campaign": rng.choice(CAMPAIGNS), "email": f"person{index}@example.com"},
        }
        if experiment.config.segments:
            body["segment"] = rng.choice([*experiment.config.segments, "standard"])
        bodies.append(json.dumps(body).encode())
    bodies += [
        b"{this is not json",
        json.dumps({"user_id": "U1", "experiment_id": "exp_not_configured_yet"}).encode(),
        json.dumps({"experiment_id": "exp_001"}).encode(),
        json.dumps({"user_id": 42, "experiment_id": "exp_001"}).encode(),
    ]
    return bodies


def summary_table(
    assignments: Counter[tuple[str, str]], dead_letters: Counter[str], registry: ExperimentRegistry
) -> str:
    """Per experiment and variant: count, observed share beside the target, and the SRM p-value.

    The p-value is the sample-ratio-mismatch test of the counts against the split (p < 0.001 is a
    mismatch), so a 40%/60% result on a 50/50 split reads as chance or as a problem, not as a guess.
    Experiments with per-segment splits have no single target, so they show none.
    """
    lines = [f"{'experiment':<28}{'variant':<16}{'count':>7}{'share':>8}{'target':>8}  SRM check"]
    by_experiment: dict[str, dict[str, int]] = {}
    for (experiment_id, variant), n in sorted(assignments.items()):
        by_experiment.setdefault(experiment_id, {})[variant] = n
    for experiment_id, counts in by_experiment.items():
        experiment = registry.get(experiment_id)
        split = experiment.config.split if experiment is not None and not experiment.config.segments else None
        verdict = _srm_verdict(counts, split) if split else "split varies by segment"
        total = sum(counts.values())
        for index, (variant, n) in enumerate(counts.items()):
            target = f"{split.get(variant, 0.0):>8.1%}" if split else f"{'-':>8}"
            tail = f"  {verdict}" if index == 0 else ""
            lines.append(f"{experiment_id if index == 0 else '':<28}{variant:<16}{n:>7}{n / total:>8.1%}{target}{tail}")
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
