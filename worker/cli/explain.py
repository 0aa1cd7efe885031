"""``ab-worker explain``: one user's decision, step by step, from the walk that decides it.

The steps come from the experiment's :meth:`~worker.domain.allocation.AllocatedExperiment.explain`,
the decision walk itself with a recorder (``docs/allocation.md`` §2.11): never a second
implementation, so an explanation cannot disagree with what the worker decided for the same request.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from schemas.models import effective_segment
from worker.bootstrap import ExperimentRegistry, environment_settings
from worker.cli.common import EXIT_OK, Subcommands, add_decision_arguments, formatter
from worker.cli.render.explain import render_explanation
from worker.domain.errors import UnknownExperimentError, UsageError
from worker.domain.moments import utc_iso

EPILOG = """\
Each step of docs/allocation.md is printed in order: override, status, schedule, targeting,
holdout, layer, coverage, bucket. Its outcome is 'decided' (this step gave the answer), 'go on',
'not configured' (the experiment does not use it) or 'not reached'; hashed steps show the hash
input, its value and the threshold it was compared with. Targeting shows each clause and the kind of
the attribute it read (missing, string, number, ...), never the attribute's value: paste an
explanation into a ticket without leaking the context.

examples:
  ab-worker explain --experiment exp_001 --user U123 --config deploy/experiments.yaml
  ab-worker explain --experiment exp_cta --user U42 --context '{"country": "US"}' --at 2026-12-01T09:00:00Z
  ab-worker explain --experiment exp_cta --user U42 --json
"""


def registry_from(config: str | None) -> ExperimentRegistry:
    """The registry of ``--config``, else of ``AB_WORKER_EXPERIMENTS_FILE``; a usage error when neither is set."""
    path = config or environment_settings().experiments_file
    if not path:
        raise UsageError("no experiments: pass --config FILE or set AB_WORKER_EXPERIMENTS_FILE")
    return ExperimentRegistry.load(path)


def cmd_explain(args: argparse.Namespace) -> int:
    """Print how one request would be decided: every step in order, then the variant and the reason."""
    registry = registry_from(args.config)
    at = args.at or datetime.now(UTC)
    try:
        experiment = registry.experiment(args.experiment)
        explanation = registry.explain(args.experiment, args.user, segment=args.segment, context=args.context, at=at)
    except UnknownExperimentError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # the id or segment the wire contract refuses
        raise UsageError(f"--user/--segment: {exc}") from None
    # The segment the walk used: --segment, else the context's (the worker's rule for requests).
    segment = effective_segment(args.segment, args.context)
    if args.json:
        document: dict[str, object] = {
            "experiment_version": experiment.config.version,
            "user_id": args.user,
            "segment": segment,
            "at": utc_iso(at),
            **explanation.to_dict(),
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return EXIT_OK
    lines = render_explanation(
        explanation, user_id=args.user, segment=segment, at=at, experiment_version=experiment.config.version
    )
    print("\n".join(lines))
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Register ``explain``."""
    explain = commands.add_parser(
        "explain",
        help="show how one user's assignment is decided, step by step",
        formatter_class=formatter,
        description=(
            "Show how the worker decides one request: each allocation step in order with its hash\n"
            "input, value, threshold and outcome, then the variant, in_experiment and the reason."
        ),
        epilog=EPILOG,
    )
    explain.add_argument("--experiment", required=True, help="experiment id")
    explain.add_argument("--user", required=True, help="user id, exactly as requests carry it")
    explain.add_argument("--segment", help="the request's segment (else the context's 'segment', as on the queue)")
    add_decision_arguments(
        explain,
        context_help='the request\'s context, e.g. \'{"country": "US"}\'',
        at_help="decision time: an ISO 8601 time (UTC unless it says otherwise) or a duration back from now"
        " (default: now)",
    )
    explain.add_argument("--config", help="experiments file (default: AB_WORKER_EXPERIMENTS_FILE)")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.set_defaults(func=cmd_explain)
