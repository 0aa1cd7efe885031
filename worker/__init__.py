"""ab-assignment-worker: deterministic experiment assignment on Azure Service Bus.

The documented Python API (``docs/seeds/ab_assignment_agent.md``)::

    from worker import ABAssignmentAgent, AssignmentStrategy
    agent = ABAssignmentAgent(split_ratio={"A": 0.7, "B": 0.3}, seed="echovoice")
    agent.assign_user("U123", "exp_001")["variant_id"]
"""

from worker.domain.assignment import ABAssignmentAgent, AssignmentStrategy

__all__ = ["ABAssignmentAgent", "AssignmentStrategy"]
