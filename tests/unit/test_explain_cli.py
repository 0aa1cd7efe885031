"""``ab-worker explain``: the decision walk recorded, printed step by step, agreeing with every other surface."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.cli_runs import experiments_file, run_cli
from worker import ExperimentRegistry
from worker.cli.common import ExitStatus

REPO = Path(__file__).parents[2]
AT = "2026-12-07T12:00:00Z"
STEPS = ["override", "status", "schedule", "targeting", "holdout", "layer", "coverage", "bucket"]
#: A value the explanation must never print: it is only ever in the context.
SECRET = "jane.doe@example.com"

FILE = {
    "layers": [{"id": "checkout"}],
    "holdouts": [{"id": "q1", "share": 0.2}],
    "experiments": [
        {
            "id": "exp_cta",
            "version": "4",
            "split": {"control": 0.5, "blue": 0.5},
            "coverage": 0.7,
            "layer": {"id": "checkout", "range": [0.0, 0.8]},
            "holdouts": ["q1"],
            "targeting": {"country": {"$in": ["US", "CA"]}, "email": {"$exists": True}, "age": {"$gte": 18}},
            "overrides": {"qa-1": "blue"},
            "start_at": "2026-12-01T00:00:00Z",
        },
        {"id": "exp_plain", "split": {"A": 0.5, "B": 0.5}},
    ],
}
CONTEXT = {"country": "US", "email": SECRET, "age": 30}


@pytest.fixture
def config(tmp_path: Path) -> str:
    """The experiments file above, as YAML."""
    return experiments_file(tmp_path, FILE)


def _explain(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "explain", *argv)


def test_json_is_the_registry_explanation_and_agrees_with_assign(config: str, capsys) -> None:
    """--json holds every step of ``ExperimentRegistry.explain`` and the decision ``assign`` gives, for every reason."""
    registry = ExperimentRegistry.load(config)
    at = datetime(2026, 12, 7, 12, tzinfo=UTC)
    reasons = set()
    for user in ["qa-1", *(f"U{i}" for i in range(60))]:
        status, out, _ = _explain(
            capsys, "--experiment", "exp_cta", "--user", user, "--context", json.dumps(CONTEXT), "--at", AT,
            "--config", config, "--json",
        )  # fmt: skip
        assert status == ExitStatus.OK
        document = json.loads(out)
        assigned = registry.assign("exp_cta", user, context=CONTEXT, at=at)
        decided = (document["variant_id"], document["in_experiment"], document["reason"], document["hash_value"])
        assert decided == (assigned.variant_id, assigned.in_experiment, assigned.reason, assigned.hash_value)
        assert document["config_version"] == assigned.config_version
        assert document["steps"] == registry.explain("exp_cta", user, context=CONTEXT, at=at).to_dict()["steps"]
        assert [*[step["step"] for step in document["steps"]][:1], document["steps"][-1]["step"]] == [
            "override",
            "bucket",
        ]
        assert (document["user_id"], document["at"], document["experiment_version"]) == (user, AT, "4")
        reasons.add(document["reason"])
    assert reasons >= {"override", "holdout", "layer", "coverage", "bucketed"}


def test_text_shows_each_step_with_hash_input_value_threshold_and_outcome(config: str, capsys) -> None:
    """The table lists the eight steps in order; the hashed ones show input, value and threshold; then the verdict."""
    registry = ExperimentRegistry.load(config)
    at = datetime(2026, 12, 7, 12, tzinfo=UTC)
    user = next(
        f"U{i}" for i in range(500) if registry.assign("exp_cta", f"U{i}", context=CONTEXT, at=at).reason == "bucketed"
    )
    args = ("--experiment", "exp_cta", "--user", user, "--context", json.dumps(CONTEXT), "--at", AT, "--config", config)
    status, out, _ = _explain(capsys, *args)
    assert status == ExitStatus.OK
    lines = out.splitlines()
    rows = [line.split() for line in lines if line[:1].isdigit()]
    assert [row[1] for row in rows] == STEPS
    by_step = {row[1]: line for row, line in zip(rows, (line for line in lines if line[:1].isdigit()), strict=True)}
    assigned = registry.assign("exp_cta", user, context=CONTEXT, at=at)
    assert f"exp_cta:{user}" in by_step["bucket"]
    assert f"{assigned.hash_value:.6f}" in by_step["bucket"]
    assert assigned.threshold is not None
    assert f"[{assigned.threshold[0]!r}, {assigned.threshold[1]!r})" in by_step["bucket"]
    assert f"holdout:q1:{user}" in by_step["holdout"]
    assert "< 0.2" in by_step["holdout"]
    assert f"layer:checkout:{user}" in by_step["layer"]
    assert "[0.0, 0.8)" in by_step["layer"]
    assert f"coverage:echovoice:exp_cta:{user}" in by_step["coverage"]
    assert "< 0.7" in by_step["coverage"]
    assert "go on" in by_step["targeting"]
    assert "decided" in by_step["bucket"]
    assert lines[-1] == f"variant {assigned.variant_id!r}, in_experiment true, reason bucketed"
    assert "config " + assigned.config_version in lines[0]


def test_no_context_value_is_ever_shown(config: str, capsys) -> None:
    """Targeting names each clause and the kind of its attribute, never the value (text and JSON, match or not)."""
    for context in (CONTEXT, {**CONTEXT, "country": "FR"}, {**CONTEXT, "age": "thirty"}):
        for extra in ((), ("--json",)):
            status, out, _ = _explain(
                capsys, "--experiment", "exp_cta", "--user", "U1", "--context", json.dumps(context), "--at", AT,
                "--config", config, *extra,
            )  # fmt: skip
            assert status == ExitStatus.OK
            assert SECRET not in out
            assert "FR" not in out
            assert "thirty" not in out
            assert "(string)" in out


def test_at_decides_the_schedule_and_takes_a_zone(config: str, capsys) -> None:
    """Before start_at the walk stops at the schedule (not_started); --at with an offset is that instant."""
    base = ("--experiment", "exp_cta", "--user", "U1", "--config", config, "--json")
    status, out, _ = _explain(capsys, *base, "--at", "2026-12-01T00:59:59+01:00")  # 23:59:59Z the day before
    assert status == ExitStatus.OK
    document = json.loads(out)
    assert document["reason"] == "not_started"
    assert document["at"] == "2026-11-30T23:59:59Z"
    assert [s["outcome"] for s in document["steps"]][2:4] == ["decided", "not reached"]
    status, out, _ = _explain(capsys, *base, "--at", "2026-12-01T01:00:00+01:00")
    assert json.loads(out)["reason"] != "not_started"


def test_config_defaults_to_the_environment(config: str, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config, AB_WORKER_EXPERIMENTS_FILE names the file; with neither, one line says what to do."""
    monkeypatch.setenv("AB_WORKER_EXPERIMENTS_FILE", config)
    status, out, _ = _explain(capsys, "--experiment", "exp_plain", "--user", "U123", "--json")
    assert status == ExitStatus.OK
    assert json.loads(out)["reason"] == "bucketed"
    monkeypatch.delenv("AB_WORKER_EXPERIMENTS_FILE")
    status, _, err = _explain(capsys, "--experiment", "exp_plain", "--user", "U123")
    assert status == ExitStatus.USAGE
    assert err.strip() == (
        "ab-worker explain: error: no experiments: pass --config FILE or set AB_WORKER_EXPERIMENTS_FILE"
    )


def test_a_plain_experiment_is_the_seed_rule_alone(capsys) -> None:
    """exp_001 of the demo file: seven steps not configured, the bucket decides U123's known answer."""
    config = str(REPO / "deploy" / "experiments.yaml")
    status, out, _ = _explain(capsys, "--experiment", "exp_001", "--user", "U123", "--config", config, "--json")
    assert status == ExitStatus.OK
    document = json.loads(out)
    assert [s["outcome"] for s in document["steps"]] == ["not configured"] * 7 + ["decided"]
    assert (document["variant_id"], document["hash_value"], document["threshold"]) == ("A", 0.002099, [0.0, 0.5])
    assert document["steps"][-1]["hash_input"] == "echovoice:exp_001:U123"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--context", "{nope"], "argument --context: not JSON: Expecting property name enclosed in double quotes"),
        (["--context", "[1, 2]"], "argument --context: the context must be a JSON object, got an array"),
        (["--context", json.dumps({f"k{i}": i for i in range(65)})], "argument --context: the context has 65 keys"),
        (["--at", "yesterday"], "argument --at: 'yesterday' is not an ISO 8601 time"),
        (["--experiment", "exp_nope"], "experiment 'exp_nope' is not configured"),
        (["--user", "a\tb"], "--user/--segment: user_id must not contain control"),
    ],
)
def test_errors_are_one_line_naming_the_flag(config: str, capsys, argv: list[str], message: str) -> None:
    """Each bad flag is one line naming it, with status 2; nothing is printed on stdout."""
    base = {"--experiment": "exp_cta", "--user": "U1", "--config": config}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    status, out, err = _explain(capsys, *(part for pair in base.items() for part in pair))
    assert status == ExitStatus.USAGE
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1
