"""ab-assignment-worker: deterministic experiment assignment on Azure Service Bus.

The documented Python API (``docs/seeds/ab_assignment_agent.md``)::

    from worker import ABAssignmentAgent, AssignmentStrategy
    agent = ABAssignmentAgent(split_ratio={"A": 0.7, "B": 0.3}, seed="echovoice")
    agent.assign_user("U123", "exp_001")["variant_id"]

    from worker import ExperimentRegistry
    registry = ExperimentRegistry.load("deploy/experiments.yaml")
    registry.assign("exp_001", "U123", segment=None, context={"country": "US"})  # Assignment(variant_id='A', ...)
    registry.explain("exp_001", "U123")  # each allocation step, then the decision

``ExperimentRegistry`` is the composition root's (it reads the file through the adapter), imported
on first use: importing any ``worker`` module stays free of file, YAML and SDK code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.domain.assignment import ABAssignmentAgent, AssignmentStrategy

if TYPE_CHECKING:
    from worker.bootstrap import ExperimentRegistry

__all__ = ["ABAssignmentAgent", "AssignmentStrategy", "ExperimentRegistry"]


def __getattr__(name: str) -> object:
    if name == "ExperimentRegistry":
        from worker.bootstrap import ExperimentRegistry

        return ExperimentRegistry
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
