"""Cohort requests on the queue honour their experiment's allocation, as ``stratify --config`` does."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.domain.errors import DeadLetterReason, PermanentError
from worker.domain.registry import ExperimentRegistry
from worker.service.handling import COHORT_REASON, handle
from worker.service.ports import Delivery

AT = datetime(2026, 12, 7, 12, tzinfo=UTC)
SPLIT = {"control": 0.5, "treatment": 0.5}
OVERRIDDEN = {"C0001": "treatment", "C0002": "control"}
MEMBERS = [{"member_id": f"C{i:04d}", "segment": "a" if i % 2 else "b"} for i in range(1, 301)]


def _registry(**experiment: Any) -> ExperimentRegistry:
    return ExperimentRegistry.from_dict(
        {
            "layers": [{"id": "email"}],
            "holdouts": [{"id": "q4", "share": 0.1}],
            "experiments": [{"id": "cohort-exp", "split": SPLIT, **experiment}],
        }
    )


FULL = {
    "holdouts": ["q4"],
    "layer": {"id": "email", "range": [0.0, 0.8]},
    "coverage": 0.2,
    "overrides": OVERRIDDEN,
    "targeting": {"segment": {"$in": ["a", "b"]}},
}


def _cohort(message_id: str = "cohort-1") -> Delivery:
    body = {
        "kind": "cohort",
        "experiment_id": "cohort-exp",
        "arms": [{"id": "control"}, {"id": "treatment"}],
        "min_per_cell": 1,
        "members": MEMBERS,
    }
    return Delivery(body=json.dumps(body).encode(), message_id=message_id, enqueued_time=AT)


def test_members_a_step_decides_keep_that_decision_and_the_rest_are_stratified() -> None:
    """Held-out, out-of-layer and overridden members get the live decision; no stratified member is one of them."""
    registry = _registry(**FULL)
    handled = handle(_cohort(), registry, max_body_bytes=1 << 20)
    events = {event.user_id: event for event in handled.events}
    assert len(events) == len(MEMBERS)
    config_version = registry.experiment("cohort-exp").allocation.config_version
    reasons = set()
    for member in MEMBERS:
        event = events[member["member_id"]]
        live = registry.assign("cohort-exp", member["member_id"], segment=member["segment"], at=AT)
        assert event.config_version == config_version
        if event.reason == COHORT_REASON:
            assert event.in_experiment is True
            assert live.reason in {"bucketed", "coverage"}
            assert event.experiment_arm in {"control", "treatment"}
        else:
            assert (event.variant_id, event.in_experiment, event.reason) == (live.variant_id, False, live.reason)
            assert event.experiment_arm is None
        reasons.add(event.reason)
    assert reasons == {COHORT_REASON, "override", "holdout", "layer"}
    report = json.loads(handled.extras[0].body)
    allocation = report["report"]["allocation"]
    assert allocation["decided"] + allocation["stratified"] == len(MEMBERS) == report["member_count"]
    assert set(allocation["counts"]) == {"override", "holdout", "layer"}
    assert allocation["config_version"] == config_version


def test_a_replayed_cohort_gives_the_same_events() -> None:
    """Decisions depend on the enqueued time and the file only: a redelivery is byte-identical."""
    registry = _registry(**FULL)
    first = handle(_cohort(), registry, max_body_bytes=1 << 20)
    again = handle(_cohort(), registry, max_body_bytes=1 << 20)
    assert [e.model_dump_json() for e in first.events] == [e.model_dump_json() for e in again.events]


def test_an_experiment_without_steps_or_not_configured_is_stratified_as_before() -> None:
    """A plain experiment, or a cohort label the registry lacks: every member stratified, no allocation section."""
    for registry in (_registry(), ExperimentRegistry.from_dict({"experiments": [{"id": "other", "split": SPLIT}]})):
        handled = handle(_cohort(), registry, max_body_bytes=1 << 20)
        assert {(e.in_experiment, e.reason, e.config_version) for e in handled.events} == {(True, COHORT_REASON, "")}
        assert "allocation" not in json.loads(handled.extras[0].body)["report"]


@pytest.mark.parametrize(
    ("experiment", "reasons"),
    [
        ({"status": "stopped"}, "stopped 300"),
        ({"start_at": "2026-12-08T00:00:00Z"}, "not_started 300"),
        ({"targeting": {"country": "US"}}, "targeting 300"),
    ],
)
def test_a_cohort_every_member_of_which_a_step_decides_is_dead_lettered(
    experiment: dict[str, Any], reasons: str
) -> None:
    """Nothing to stratify is InvalidCohort naming the reasons (members carry no context for targeting)."""
    with pytest.raises(PermanentError) as caught:
        handle(_cohort(), _registry(**experiment), max_body_bytes=1 << 20)
    assert caught.value.reason == DeadLetterReason.INVALID_COHORT
    assert (
        f"nothing to stratify: the allocation of cohort-exp decides every member before stratification ({reasons})"
        in caught.value.description
    )
