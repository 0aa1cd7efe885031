"""Allocation: overrides, lifecycle, schedule, targeting, holdouts, layers and coverage before the seed rule.

One small deterministic algebra (``docs/allocation.md``) shared by the worker, the command line, the
Python API and the cohort path. Pure: it imports only ``schemas`` and ``worker.domain``.

    allocation = compile_file(ExperimentFile.model_validate(document), "experiments.yaml")
    decision = allocation.experiments["exp_cta"].decide(user_id, segment, context, at)
    explanation = allocation.experiments["exp_cta"].explain(user_id, segment, context, at)
    report = changes(old_allocation, new_allocation, at=at)
"""

from worker.domain.allocation.changes import EditReport, ExperimentChange, changes
from worker.domain.allocation.compile import AllocationFile, compile_file, default_control, file_problems
from worker.domain.allocation.conditions import CompiledCondition, ConditionProblem, compile_condition, operand_kinds
from worker.domain.allocation.experiment import AllocatedExperiment, Decision, Explanation, Reason, StepRecord
from worker.domain.allocation.versions import compare_versions, is_version, version_key

__all__ = [
    "AllocatedExperiment",
    "AllocationFile",
    "CompiledCondition",
    "ConditionProblem",
    "Decision",
    "EditReport",
    "ExperimentChange",
    "Explanation",
    "Reason",
    "StepRecord",
    "changes",
    "compare_versions",
    "compile_condition",
    "compile_file",
    "default_control",
    "file_problems",
    "is_version",
    "operand_kinds",
    "version_key",
]
