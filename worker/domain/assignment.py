"""Deterministic MD5 bucketing: the rule of ``docs/seeds/ab_assignment_agent.md``, bit for bit.

``bucket = (int(md5(f"{seed}:{experiment_id}:{user_id}").hexdigest()[:8], 16) % 1_000_000) / 1e6``

Variants are ordered by id (plain string sort); each gets ``[lower, upper)`` with ``upper`` built by
adding the ratios as floats in that order. The variant is the first whose range holds the bucket,
or the last variant when none does (ratios summing to slightly under 1).

Two paths compute it. :meth:`ABAssignmentAgent.assign_user` returns the documented dict.
:func:`assign_variants` is the batch path for files and benchmarks: it runs the whole pipeline in
C-level ``map`` chains and numpy, with no per-user Python bytecode. Both are checked against the
conformance file ``schemas/assignment-cases.json``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from numbers import Real
from operator import itemgetter
from types import MappingProxyType
from typing import Any

import numpy as np

from schemas.models import MAX_ID_CHARS
from schemas.text import text_problem
from worker.domain.errors import SplitRatioError, UnsupportedStrategyError

DEFAULT_SEED = "echovoice"
DEFAULT_SPLIT: dict[str, float] = {"A": 0.5, "B": 0.5}
BUCKETS = 1_000_000
#: The seed document's tolerance on the sum of the ratios.
SPLIT_SUM_MIN, SPLIT_SUM_MAX = 0.99, 1.01


def _md5_constructor() -> Callable[[bytes], Any]:
    # CPython's built-in MD5 is about twice as fast as OpenSSL's on keys this short (no EVP context
    # per call) and gives identical digests; it has no FIPS gate, so it is called bare. Where Python
    # was built without it, OpenSSL's is used with usedforsecurity=False, which FIPS-mode hosts
    # require before they hand out MD5.
    try:
        import _md5  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - depends on how CPython was built
        return functools.partial(hashlib.md5, usedforsecurity=False)
    constructor: Callable[[bytes], Any] = _md5.md5
    return constructor


#: The MD5 constructor and ``digest`` as plain callables, for ``map`` chains here and in stratify.
md5 = _md5 = _md5_constructor()
digest: Callable[[Any], bytes] = type(_md5(b"")).digest
_digest = digest
#: The first 4 digest bytes as a big-endian integer: int(hexdigest[:8], 16), without the hex.
_first_word: Callable[[bytes], tuple[int]] = struct.Struct(">I").unpack_from


class AssignmentStrategy(StrEnum):
    """Assignment strategies named by the seed document. Only ``MD5_HASH`` can be served."""

    MD5_HASH = "md5_hash"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


def bucket_key(seed: str, experiment_id: str, user_id: str) -> bytes:
    """The exact bytes hashed for one user: ``f"{seed}:{experiment_id}:{user_id}"`` in UTF-8."""
    return f"{seed}:{experiment_id}:{user_id}".encode()


def bucket_int(seed: str, experiment_id: str, user_id: str) -> int:
    """The bucket as an integer in ``[0, 1_000_000)``: first 8 hex digits of the MD5, mod 1e6."""
    return _first_word(_digest(_md5(bucket_key(seed, experiment_id, user_id))))[0] % BUCKETS


def bucket(seed: str, experiment_id: str, user_id: str) -> float:
    """The bucket in ``[0, 1)`` exactly as the seed computes it (an integer divided by 1e6)."""
    return bucket_int(seed, experiment_id, user_id) / BUCKETS


def validate_split(split_ratio: Mapping[str, Any]) -> dict[str, float]:
    """Check split ratios and return them as a plain ``{variant_id: float}`` dict.

    Raises :class:`SplitRatioError` (a ``ValueError``) naming the offending ratios.
    """
    # Exact types first throughout: isinstance against the ABCs is slow, and this runs for every new split.
    if not (type(split_ratio) is dict or isinstance(split_ratio, Mapping)) or not split_ratio:
        raise SplitRatioError(f"Split ratio must be a non-empty mapping of variant id to share, got {split_ratio!r}")
    clean: dict[str, float] = {}
    for variant_id, ratio in split_ratio.items():
        if not (type(variant_id) is str or isinstance(variant_id, str)) or not variant_id:
            raise SplitRatioError(f"Variant ids must be non-empty strings, got {variant_id!r} in {dict(split_ratio)!r}")
        if type(ratio) is not float and (isinstance(ratio, bool) or not isinstance(ratio, Real)):
            raise SplitRatioError(f"Split ratio for variant {variant_id!r} must be a number, got {ratio!r}")
        value = float(ratio)
        if not 0.0 <= value < math.inf:  # false for NaN, infinities and negatives
            raise SplitRatioError(f"Split ratio for variant {variant_id!r} must be a finite number >= 0, got {ratio!r}")
        clean[variant_id] = value
    total = math.fsum(clean.values())
    if not SPLIT_SUM_MIN <= total <= SPLIT_SUM_MAX:
        raise SplitRatioError(
            f"Split ratios must sum to 1.0 (within {SPLIT_SUM_MIN}-{SPLIT_SUM_MAX}), got {total!r} from {clean!r}"
        )
    return clean


def compute_thresholds(split_ratio: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """``{variant_id: (lower, upper)}`` in sorted id order, uppers summed as floats in that order."""
    thresholds: dict[str, tuple[float, float]] = {}
    cumulative = 0.0
    for variant_id in sorted(split_ratio):
        lower = cumulative
        cumulative += split_ratio[variant_id]
        thresholds[variant_id] = (lower, cumulative)
    return thresholds


def _integer_cutoff(upper: float) -> int:
    """Smallest integer bucket ``m`` with ``m / 1e6 >= upper`` (so ``m / 1e6 < upper`` iff ``m < cutoff``).

    Computed against the same float division the seed uses, so integer comparisons agree with its
    float comparisons bit for bit, including at boundaries such as 0.30000000000000004.
    """
    m = min(max(math.floor(upper * BUCKETS) - 1, 0), BUCKETS)
    while m < BUCKETS and m / BUCKETS < upper:
        m += 1
    while m > 0 and (m - 1) / BUCKETS >= upper:
        m -= 1
    return m


class VariantTable:
    """A split compiled for fast lookups: float bounds for one user, integer cutoffs and a dense
    bucket → variant table for many (both integer forms built on first use)."""

    __slots__ = ("_cutoffs", "_lookup", "bounds", "names", "picks", "split", "thresholds", "variant_ids")

    def __init__(self, split_ratio: Mapping[str, float]) -> None:
        self.split: dict[str, float] = dict(split_ratio)
        self.thresholds = compute_thresholds(split_ratio)
        self.variant_ids: list[str] = list(self.thresholds)
        #: ``names[bisect_right(bounds, bucket / 1e6)]`` is the variant, by the seed's own float
        #: comparisons: the first upper bound above the bucket. Leaving out the last upper bound makes
        #: every bucket past the others fall to the last variant, as the seed's fallback does.
        self.bounds: tuple[float, ...] = tuple(map(itemgetter(1), self.thresholds.values()))[:-1]
        self.names: tuple[str, ...] = tuple(self.variant_ids)
        self.picks: tuple[tuple[str, tuple[float, float]], ...] = tuple(self.thresholds.items())
        self._cutoffs: list[int] | None = None
        self._lookup: np.ndarray[Any, np.dtype[np.uint8]] | None = None

    @property
    def cutoffs(self) -> list[int]:
        """Integer bucket cutoffs agreeing with the float bounds (``bucket < cutoff`` iff ``bucket / 1e6 < upper``)."""
        if self._cutoffs is None:
            self._cutoffs = [_integer_cutoff(upper) for _, upper in self.thresholds.values()]
        return self._cutoffs

    def shares(self) -> dict[str, float]:
        """The fraction of the 1,000,000 buckets each variant really gets under the rule.

        Equal to the ratios when they sum to 1; otherwise the last variant (in id order) takes the
        leftover — ``{"A": 0.5, "B": 0.49}`` gives B half the buckets — and ratios past 1 are cut.
        """
        counts: dict[str, float] = {}
        start = 0
        for index, variant_id in enumerate(self.variant_ids):
            last = index == len(self.variant_ids) - 1
            end = BUCKETS if last else min(max(self.cutoffs[index], start), BUCKETS)
            counts[variant_id] = (end - start) / BUCKETS
            start = end
        return counts

    def index_for(self, bucket_value: int) -> int:
        """Index into :attr:`variant_ids` for an integer bucket; the last variant when none matches."""
        return min(bisect_right(self.cutoffs, bucket_value), len(self.variant_ids) - 1)

    def variant_for(self, bucket_value: int) -> str:
        """The variant id for an integer bucket."""
        return self.variant_ids[self.index_for(bucket_value)]

    def lookup(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Dense array mapping every integer bucket to its variant index, built once (1 MB)."""
        if self._lookup is None:
            table = np.full(BUCKETS, len(self.variant_ids) - 1, dtype=np.uint8)
            start = 0
            for index, cutoff in enumerate(self.cutoffs):
                end = min(max(cutoff, start), BUCKETS)
                table[start:end] = index
                start = end
            self._lookup = table
        return self._lookup


#: Distinct splits whose compiled tables are kept for new agents. A table is a few hundred bytes
#: until the batch path builds its 1 MB dense lookup; agents keep their own table alive regardless.
SHARED_TABLES = 256


@functools.lru_cache(maxsize=SHARED_TABLES)
def shared_table(split_items: tuple[tuple[str, float], ...]) -> VariantTable:
    """The compiled table for a validated split given as ``(variant_id, ratio)`` pairs, shared by agents."""
    return VariantTable(dict(split_items))


_MD5_HASH = AssignmentStrategy.MD5_HASH.value
#: An agent's remembered experiment before its first assignment: no id is this object.
_NO_EXPERIMENT: tuple[object, str] = (object(), "")


#: Ratio types whose equal values are interchangeable as cache keys (bool is refused by validation,
#: so it must not share a key with 1 and 0; Decimal is refused, so it must not share one with floats).
_PLAIN_RATIOS = frozenset({float, int})


@functools.lru_cache(maxsize=SHARED_TABLES)
def _compiled(split_items: tuple[tuple[str, float], ...]) -> VariantTable:
    return VariantTable(validate_split(dict(split_items)))


def _compile(split_ratio: Mapping[str, Any]) -> VariantTable:
    """The shared table of a split, validated first; raises :class:`SplitRatioError`."""
    if type(split_ratio) is dict and set(map(type, split_ratio.values())) <= _PLAIN_RATIOS:
        return _compiled(tuple(split_ratio.items()))
    return shared_table(tuple(validate_split(split_ratio).items()))


#: Users hashed per chunk: small enough that keys, digests and their join stay in the CPU cache
#: (measured: 8k-user chunks run the batch path ~1.5x faster than one 1M-user pass).
HASH_CHUNK = 8192


def _chunk_keys(prefix: str, user_ids: Sequence[str]) -> list[bytes]:
    # One join, one encode and one split build every key in C. A user id containing the separator
    # would split wrongly, so the separator count is checked and the plain per-id path used instead.
    separator = "\n"
    text = prefix + (separator + prefix).join(user_ids)
    if text.count(separator) != len(user_ids) - 1:
        encoded = prefix.encode()
        return list(map(encoded.__add__, map(str.encode, user_ids)))
    return text.encode().split(separator.encode())


def bucket_ints(seed: str, experiment_id: str, user_ids: Sequence[str]) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """Integer buckets for many users at once; the hot loop runs in C (map chains and numpy)."""
    prefix = f"{seed}:{experiment_id}:"
    parts = []
    for start in range(0, len(user_ids), HASH_CHUNK):
        keys = _chunk_keys(prefix, user_ids[start : start + HASH_CHUNK])
        joined = b"".join(map(_digest, map(_md5, keys)))
        parts.append(np.frombuffer(joined, dtype=">u4")[::4] % BUCKETS)
    if not parts:
        return np.zeros(0, dtype=np.uint32)
    return np.concatenate(parts).astype(np.uint32, copy=False)


def assign_variants(
    user_ids: Sequence[str], experiment_id: str, table: VariantTable, seed: str = DEFAULT_SEED
) -> tuple[np.ndarray[Any, np.dtype[np.uint32]], list[str]]:
    """Batch path: integer buckets and variant ids for ``user_ids``, identical to ``assign_user``."""
    buckets = bucket_ints(seed, experiment_id, user_ids)
    indexes = table.lookup()[buckets]
    return buckets, list(map(table.variant_ids.__getitem__, indexes.tolist()))


def _check_strategy(strategy: AssignmentStrategy | str) -> AssignmentStrategy:
    if strategy is AssignmentStrategy.MD5_HASH:
        return strategy
    try:
        chosen = AssignmentStrategy(strategy)
    except ValueError:
        valid = ", ".join(s.value for s in AssignmentStrategy)
        raise UnsupportedStrategyError(f"Unknown assignment strategy {strategy!r}; expected one of {valid}") from None
    if chosen is not AssignmentStrategy.MD5_HASH:
        raise UnsupportedStrategyError(
            f"Strategy {chosen.value!r} cannot be honoured by a stateless, deterministic worker: "
            "round robin needs a shared counter and random gives a user a different variant on every "
            "redelivery or replica. Use AssignmentStrategy.MD5_HASH."
        )
    return chosen


def _raise_invalid_ids(user_id: object, experiment_id: object) -> None:
    """Raise ``ValueError`` when either id breaks the contract's rule (non-printable text may still pass)."""
    for name, value in (("user_id", user_id), ("experiment_id", experiment_id)):
        problem = text_problem(value, MAX_ID_CHARS)
        if problem:
            raise ValueError(f"{name} {problem} (got {value!r:.80})")


#: ``assign_user``'s dict, in the documented key order, with the two values that never change.
_RESULT_TEMPLATE: dict[str, Any] = dict.fromkeys(
    ("variant_id", "hash_value", "threshold", "experiment_id", "user_id", "strategy", "deterministic", "split_ratio")
) | {"strategy": _MD5_HASH, "deterministic": True, "context": None}


class ABAssignmentAgent:
    """The documented Python API: deterministic assignment of users to variants by MD5 bucketing."""

    REQUIRED_FIELDS = ("variant_id", "hash_value", "experiment_id", "user_id")

    def __init__(
        self,
        split_ratio: Mapping[str, float] | None = None,
        strategy: AssignmentStrategy | str = AssignmentStrategy.MD5_HASH,
        seed: str = DEFAULT_SEED,
    ) -> None:
        self.strategy = strategy if strategy is AssignmentStrategy.MD5_HASH else _check_strategy(strategy)
        # Agents are built freely (one per segment or per week, as the seed's own examples do), so
        # construction stays cheap: the checked, compiled split is shared between agents with the same
        # split, and the 1 MB dense table behind the batch path is built only when that path is used.
        self._table = _compile(DEFAULT_SPLIT if split_ratio is None else split_ratio)
        self._seed = seed
        self._experiment: tuple[object, str] = _NO_EXPERIMENT

    @property
    def seed(self) -> str:
        """The hash seed; setting it re-keys every later assignment."""
        return self._seed

    @seed.setter
    def seed(self, value: str) -> None:
        self._seed = value
        self._experiment = _NO_EXPERIMENT

    @property
    def split_ratio(self) -> dict[str, float]:
        """The validated split as ``{variant_id: ratio}`` (a copy: the compiled split is shared)."""
        return self._table.split.copy()

    @property
    def variant_ids(self) -> list[str]:
        """Variant ids in sorted order (the order their ranges are laid out in)."""
        return list(self._table.variant_ids)

    @property
    def thresholds(self) -> Mapping[str, tuple[float, float]]:
        """``{variant_id: (lower, upper)}``, read-only: the compiled split is shared between agents."""
        return MappingProxyType(self._table.thresholds)

    @property
    def table(self) -> VariantTable:
        """The compiled split, for the batch path."""
        return self._table

    def assign_user(self, user_id: str, experiment_id: str, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Assign one user; the same (seed, experiment, user) always gives the same result.

        ``user_id`` and ``experiment_id`` follow the wire contract's rule for ids (1–1024 characters,
        none of the characters :mod:`schemas.text` refuses): anything else raises ``ValueError``,
        exactly as the worker dead-letters such a request.
        """
        # The experiment id is usually the same object call after call: checked once, its key prefix
        # kept. The user id's common case is decided in C with the fewest calls: a non-empty string whose
        # isprintable() is True (False for every character the rule refuses) and not over the limit. A
        # non-string fails on the truth test or has no isprintable(); anything else gets the full check.
        experiment = self._experiment
        if experiment_id is not experiment[0]:
            if not (
                type(experiment_id) is str and 0 < len(experiment_id) <= MAX_ID_CHARS and experiment_id.isprintable()
            ):
                _raise_invalid_ids("U", experiment_id)
            # One tuple, replaced whole, so threads sharing the agent never pair an id with another's prefix.
            experiment = self._experiment = (experiment_id, f"{self._seed}:{experiment_id}:")
        try:
            if not (user_id and user_id.isprintable() and len(user_id) <= MAX_ID_CHARS):
                _raise_invalid_ids(user_id, experiment_id)
        except AttributeError:
            _raise_invalid_ids(user_id, experiment_id)
        # value / 1e6 is already the double nearest the 6-place decimal, so it equals
        # round(value / 1e6, 6); the conformance tests hold this for every case.
        hash_value = (_first_word(_digest(_md5((experiment[1] + user_id).encode())))[0] % BUCKETS) / BUCKETS
        table = self._table
        variant_id, threshold = table.picks[bisect_right(table.bounds, hash_value)]
        # Filling a copy of a template is cheaper than a nine-key literal (measured: about 20 ns a call).
        result = _RESULT_TEMPLATE.copy()
        result["variant_id"] = variant_id
        result["hash_value"] = hash_value
        result["threshold"] = threshold
        result["experiment_id"] = experiment_id
        result["user_id"] = user_id
        result["split_ratio"] = table.split.copy()
        result["context"] = dict(context) if context else {}
        return result

    def assign_many(self, user_ids: Sequence[str], experiment_id: str) -> list[str]:
        """Variant ids only, for many users at once (the batch path). Ids as for :meth:`assign_user`."""
        ids = list(user_ids)
        # Checked in C for the common case, as in assign_user; per id only when something is off.
        clean = set(map(type, ids)) <= {str} and all(ids) and max(map(len, ids), default=0) <= MAX_ID_CHARS
        if not (clean and "".join(ids).isprintable()):
            for user_id in ids:
                _raise_invalid_ids(user_id, experiment_id)
        _raise_invalid_ids("U", experiment_id)
        return assign_variants(ids, experiment_id, self._table, self.seed)[1]

    def validate_assignment(self, assignment: Mapping[str, Any]) -> tuple[bool, str | None]:
        """Check an assignment dict: required fields present, variant known, hash in ``[0, 1)``."""
        for field in self.REQUIRED_FIELDS:
            if field not in assignment:
                return False, f"Missing required field: {field}"
        if assignment["variant_id"] not in self._table.names:
            return False, f"Invalid variant_id: {assignment['variant_id']}"
        hash_value = assignment["hash_value"]
        if isinstance(hash_value, bool) or not isinstance(hash_value, Real) or not 0.0 <= float(hash_value) < 1.0:
            return False, f"Hash value out of range: {hash_value}"
        return True, None
