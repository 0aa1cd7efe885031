"""The worker's decision: each request decided by its experiment's allocation, at its enqueued time."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.models import AssignmentRecord
from worker import ABAssignmentAgent, ExperimentRegistry
from worker.domain.assignment import BUCKETS, bucket_int
from worker.service.handling import COHORT_REASON, decision_time, handle
from worker.service.ports import Delivery

ROOT = Path(__file__).parents[2]
DEMO = ExperimentRegistry.load(ROOT / "deploy" / "experiments.yaml")
START = datetime(2026, 12, 1, tzinfo=UTC)
FEATURES = ExperimentRegistry.from_dict(
    {
        "layers": [{"id": "checkout"}],
        "holdouts": [{"id": "h", "share": 0.1}],
        "experiments": [
            {"id": "nothing", "split": {"control": 0.5, "blue": 0.5}, "coverage": 0.0},
            {"id": "qa", "split": {"control": 0.5, "blue": 0.5}, "overrides": {"tester": "blue"}},
            {"id": "later", "split": {"control": 0.5, "blue": 0.5}, "start_at": START.isoformat()},
            {
                "id": "full",
                "split": {"control": 0.5, "blue": 0.5},
                "coverage": 0.5,
                "layer": {"id": "checkout", "range": [0.0, 0.5]},
                "holdouts": ["h"],
                "targeting": {"email": {"$in": ["vip@example.com"]}, "age": {"$gte": 18}},
            },
        ],
    }
)


def _delivery(body: dict[str, Any], message_id: str = "m-1", at: datetime | None = START) -> Delivery:
    return Delivery(body=json.dumps(body).encode(), message_id=message_id, enqueued_time=at)


def _event(registry: ExperimentRegistry, body: dict[str, Any], **delivery: Any) -> Any:
    (event,) = handle(_delivery(body, **delivery), registry, context_allow_list=("campaign",)).events
    return event


@pytest.mark.parametrize("experiment", ["exp_001", "exp_personalization_001", "exp_tone_abcd"])
@pytest.mark.parametrize("segment", [None, "high_intent", "low_intent", "standard"])
def test_plain_experiments_decide_bit_exactly_as_before(experiment: str, segment: str | None) -> None:
    """Without allocation fields: the variant, hash_value and threshold of the seed rule, as the worker gave them."""
    config = DEMO.get(experiment)
    assert config is not None
    assert config.plain
    agent = ABAssignmentAgent(dict(config.split_for(segment)), seed=config.config.seed)
    for index in range(1500):
        user = f"user-{index}"
        body: dict[str, Any] = {"user_id": user, "experiment_id": experiment}
        if segment is not None:
            body["segment"] = segment
        event = _event(DEMO, body)
        expected = agent.assign_user(user, experiment)
        # Today's formula in the worker, restated: round(h_int / 1e6, 6) and the table's range.
        assert event.hash_value == round(bucket_int(config.config.seed, experiment, user) / BUCKETS, 6)
        assert (event.variant_id, event.hash_value, event.threshold) == (
            expected["variant_id"],
            expected["hash_value"],
            expected["threshold"],
        )
        assert (event.in_experiment, event.reason) == (True, "bucketed")
        assert event.config_version == config.allocation.config_version


def test_the_event_says_why_and_carries_no_bucket_when_not_bucketed() -> None:
    """Gates serve control (or an override) with in_experiment false, the reason, and null hash and threshold."""
    ramp = _event(FEATURES, {"user_id": "U1", "experiment_id": "nothing"})
    assert (ramp.variant_id, ramp.in_experiment, ramp.reason, ramp.hash_value, ramp.threshold) == (
        "control",
        False,
        "coverage",
        None,
        None,
    )
    qa = _event(FEATURES, {"user_id": "tester", "experiment_id": "qa"})
    assert (qa.variant_id, qa.in_experiment, qa.reason, qa.hash_value) == ("blue", False, "override", None)
    assert len(qa.config_version) == 16
    assert qa.config_version != ramp.config_version
    row = AssignmentRecord.from_event(ramp)
    assert (row.InExperiment, row.Reason, row.ConfigVersion, row.HashValue) == (
        False,
        "coverage",
        ramp.config_version,
        None,
    )


def test_the_decision_time_is_the_enqueued_time_not_now() -> None:
    """A request enqueued before start_at is not_started whenever it is handled; one enqueued at start_at is in."""
    body = {"user_id": "U7", "experiment_id": "later"}
    before = _event(FEATURES, body, at=START - timedelta(microseconds=1))
    at_start = _event(FEATURES, body, at=START)
    assert (before.reason, before.in_experiment, before.variant_id) == ("not_started", False, "control")
    assert (at_start.reason, at_start.in_experiment) == ("bucketed", True)
    assert before.assigned_at == START - timedelta(microseconds=1)
    assert decision_time(_delivery(body, at=START)) == START


def test_a_source_without_enqueued_times_decides_now() -> None:
    """Files and fakes carry no enqueued time: the decision time is the current time (UTC)."""
    body = {"user_id": "U7", "experiment_id": "later"}
    event = _event(FEATURES, body, at=None)
    assert abs(event.assigned_at - datetime.now(UTC)) < timedelta(minutes=5)
    assert event.reason == ("bucketed" if datetime.now(UTC) >= START else "not_started")


def test_a_naive_enqueued_time_is_read_as_utc() -> None:
    """A naive enqueued time (a source that drops the zone) is UTC, not an error that dead-letters the request."""
    naive = _event(FEATURES, {"user_id": "U7", "experiment_id": "later"}, at=START.replace(tzinfo=None))
    assert naive.reason == "bucketed"


def test_the_same_delivery_twice_gives_byte_identical_events() -> None:
    """Stateless: handling a delivery again (a redelivery) yields the same bytes."""
    body = {"user_id": "U9", "experiment_id": "full", "context": {"email": "vip@example.com", "age": 30}}
    first = handle(_delivery(body), FEATURES).outbound(_delivery(body))
    again = handle(_delivery(body), FEATURES).outbound(_delivery(body))
    assert [m.body for m in first] == [m.body for m in again]


def test_targeting_reads_the_whole_context_and_only_allow_listed_keys_leave() -> None:
    """Targeting on email decides, yet neither the event nor its row holds the address."""
    reasons = set()
    for index in range(400):
        email = "vip@example.com" if index % 2 else f"other{index}@example.com"
        context = {"email": email, "age": 30, "campaign": "spring"}
        event = _event(FEATURES, {"user_id": f"U{index}", "experiment_id": "full", "context": context})
        reasons.add(event.reason)
        if not index % 2:
            assert event.reason == "targeting"
        assert event.context == {"campaign": "spring"}
        body = event.model_dump_json() + AssignmentRecord.from_event(event).model_dump_json()
        assert "example.com" not in body
    assert {"targeting", "holdout", "layer", "coverage", "bucketed"} <= reasons


@pytest.mark.parametrize(
    "context",
    [
        {"email": 5, "age": 30},
        {"email": ["vip@example.com"], "age": 30},
        {"email": {"address": "vip@example.com"}, "age": 30},
        {"email": "vip@example.com", "age": "thirty"},
        {"email": "vip@example.com", "age": True},
        {"email": "vip@example.com", "age": None},
        {"email": None},
        {},
    ],
)
def test_an_attribute_of_the_wrong_kind_is_no_match_never_an_error(context: dict[str, Any]) -> None:
    """A number where a string is expected, a list, an object, a boolean, null: targeting says no, nothing raises."""
    event = _event(FEATURES, {"user_id": "U1", "experiment_id": "full", "context": context})
    assert (event.reason, event.in_experiment, event.variant_id) == ("targeting", False, "control")


def test_cohort_members_are_in_the_experiment_by_stratification() -> None:
    """A cohort request's member events: in_experiment true, reason stratified, no configuration digest."""
    members = [{"member_id": f"C{i:03d}", "segment": "S" if i % 2 else "T"} for i in range(40)]
    body = {"kind": "cohort", "experiment_id": "email", "arms": [{"id": "a"}, {"id": "b"}], "members": members}
    handled = handle(_delivery(body), DEMO)
    assert len(handled.events) == 40
    assert {(e.in_experiment, e.reason, e.config_version, e.hash_value) for e in handled.events} == {
        (True, COHORT_REASON, "", None)
    }
    assert COHORT_REASON == "stratified"
