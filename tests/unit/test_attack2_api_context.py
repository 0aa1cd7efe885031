"""The Python API reads a caller's context once, at its boundary: a hostile Mapping is a clear ValueError.

``ExperimentRegistry.assign``/``.explain`` take any ``Mapping``; one whose methods raise must not let
that error escape from deep inside (``effective_segment``, targeting), and one that answers differently
on each read must not decide the segment with one answer and targeting with another.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from worker import ExperimentRegistry

REGISTRY = ExperimentRegistry.from_dict(
    {
        "experiments": [
            {"id": "plain", "split": {"control": 0.5, "blue": 0.5}},
            {"id": "targeted", "split": {"control": 0.5, "blue": 0.5}, "targeting": {"plan": "gold"}},
        ]
    }
)

AT = datetime(2026, 12, 1, tzinfo=UTC)


class Hostile(Mapping[str, Any]):
    """A Mapping whose every read raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getitem__(self, key: str) -> Any:
        raise self.error

    def get(self, key: str, default: Any = None) -> Any:
        raise self.error

    def __iter__(self) -> Iterator[str]:
        raise self.error

    def __len__(self) -> int:
        return 1


class Fickle(Mapping[str, Any]):
    """``plan`` is gold on the first read, then silver: a decision must rest on one reading."""

    def __init__(self) -> None:
        self.reads = 0

    def __getitem__(self, key: str) -> Any:
        if key != "plan":
            raise KeyError(key)
        self.reads += 1
        return "gold" if self.reads == 1 else "silver"

    def __iter__(self) -> Iterator[str]:
        return iter(["plan"])

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize("method", ["assign", "explain"])
@pytest.mark.parametrize("experiment", ["plain", "targeted"])
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("segment"), TypeError("no")])
def test_a_mapping_that_raises_is_a_value_error_naming_the_context(
    method: str, experiment: str, error: BaseException
) -> None:
    """Whatever the Mapping raises becomes one ValueError about ``context``, raised before any decision."""
    with pytest.raises(ValueError, match=r"^context could not be read as a mapping") as caught:
        getattr(REGISTRY, method)(experiment, "U1", context=Hostile(error))
    assert type(caught.value) is ValueError


def test_a_key_that_is_not_text_is_a_value_error() -> None:
    """JSON object keys are strings: any other key is refused by name of its type, not compared."""
    with pytest.raises(ValueError, match=r"^context keys must be strings, got int"):
        REGISTRY.assign("targeted", "U1", context={1: "gold"})  # type: ignore[dict-item]  # a wrong key type, on purpose


def test_a_context_over_the_contracts_limits_is_refused_as_the_worker_refuses_it() -> None:
    """The API promises a ValueError for a context the wire contract refuses; the key path is named."""
    with pytest.raises(
        ValueError, match=r"context holds a 1025-character string; the limit is 1024 \(at context.note\)"
    ):
        REGISTRY.assign("plain", "U1", context={"note": "x" * 1025})


def test_the_context_is_read_once_so_segment_and_targeting_see_the_same_values() -> None:
    """A Fickle plan is read once: the decision and the explanation agree with that one reading."""
    fickle = Fickle()
    assigned = REGISTRY.assign("targeted", "U1", context=fickle, at=AT)
    assert fickle.reads == 1
    assert assigned.reason.value == "bucketed"
    assert REGISTRY.assign("targeted", "U1", context={"plan": "gold"}, at=AT) == assigned


def test_plain_dicts_and_other_mappings_decide_alike() -> None:
    """The copy changes nothing for a well-behaved Mapping."""
    from types import MappingProxyType

    for context in ({"plan": "gold", "segment": "US"}, {"plan": "bronze"}):
        assert REGISTRY.assign("targeted", "U9", context=MappingProxyType(context), at=AT) == REGISTRY.assign(
            "targeted", "U9", context=dict(context), at=AT
        )
