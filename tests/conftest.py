"""Suite-wide scheduling: how many processes run the default suite, and in which order tests start.

Most of the suite's wall time is waiting (SDK links opening and closing, worker subprocesses,
lock expiry), so the default run spreads tests over more processes than there are cores. A
targeted run (``pytest tests/unit/test_x.py``) stays in one process, which starts faster.
"""

from __future__ import annotations

import os

import pytest

#: The longest tests (``pytest --durations``), started first so that none of them begins last and
#: alone. Only the order depends on this list: a stale or missing entry costs time, never a test.
LONGEST_FIRST = (
    "tests/unit/test_deploy.py::test_image_install_steps_produce_a_working_entrypoint",
    "tests/integration/test_faults.py::test_sigkill_mid_batch_then_restart_loses_nothing",
    "tests/integration/test_bad_input.py::test_malformed_messages_are_dead_lettered_once_with_the_right_reason",
    "tests/integration/test_worker_servicebus.py::test_broker_restart_mid_run_loses_nothing",
    "tests/integration/test_secrets.py::test_operator_commands_leak_nothing",
    "tests/integration/test_scale.py::test_two_worker_processes_share_a_queue_without_loss",
    "tests/integration/test_faults.py::test_sigterm_during_busy_run_exits_zero_in_time_and_loses_nothing",
    "tests/integration/test_secrets.py::test_error_paths_leak_nothing",
    "tests/integration/test_faults.py::test_connection_drops_and_broker_restart_lose_nothing",
    "tests/integration/test_secrets.py::test_worker_against_a_closed_port_leaks_nothing_and_stops_on_sigterm",
    "tests/integration/test_worker_servicebus.py::test_unknown_experiment_hot_reload_then_replay",
    "tests/integration/test_secrets.py::test_worker_run_at_debug_with_telemetry_leaks_nothing",
    "tests/integration/test_newcomer.py::test_two_make_runs_leave_one_runs_files_and_next_steps_that_run_as_printed",
    "tests/integration/test_drain_unreachable.py::test_a_port_that_never_speaks_ends_the_drain_with_status_5",
    "tests/integration/test_newcomer.py::test_make_broker_keeps_the_demo_and_its_dead_letters_for_the_operator_commands",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default in pyproject): 6 processes for the whole suite, none for a targeted run."""
    if config.args_source is pytest.Config.ArgsSource.ARGS:
        return 0
    return int(os.environ.get("AB_WORKER_TEST_PROCESSES", "6"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest tests first, then the other integration tests (they wait more than they compute), then the rest."""
    rank = {node_id: position for position, node_id in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> tuple[int, int]:
        if item.nodeid in rank:
            return 0, rank[item.nodeid]
        return (1 if item.get_closest_marker("integration") else 2), 0

    items.sort(key=key)
