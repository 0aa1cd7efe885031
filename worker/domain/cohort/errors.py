"""The one error of cohort assignment: every problem with the members, arms or settings, listed."""

from __future__ import annotations

from collections.abc import Sequence

from worker.domain.errors import WorkerError
from worker.domain.plural import counted

#: Problems shown in an error message; :attr:`CohortInputError.problems` keeps all of them.
MAX_SHOWN_PROBLEMS = 50


class CohortInputError(WorkerError, ValueError):
    """The cohort or the arm configuration is invalid; :attr:`problems` lists every problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        shown = "\n".join(f"  - {problem}" for problem in self.problems[:MAX_SHOWN_PROBLEMS])
        hidden = len(self.problems) - MAX_SHOWN_PROBLEMS
        if hidden > 0:
            shown += f"\n  … and {hidden} more"
        super().__init__(f"{counted(len(self.problems), 'problem')} with the cohort input:\n{shown}")
