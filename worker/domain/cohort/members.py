"""Cohort members and the one check of their ids and segments, for the API, the queue and the files alike."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from schemas.text import located, refused_character


@dataclass(frozen=True, slots=True)
class Member:
    """One cohort member: an id unique in the cohort and the segment it is stratified by."""

    member_id: str
    segment: str


class SegmentedMember(Protocol):
    """Anything with ``member_id`` and ``segment`` attributes (such as :class:`Member`)."""

    @property
    def member_id(self) -> str: ...

    @property
    def segment(self) -> str: ...


MemberLike = tuple[str, str] | SegmentedMember


def split_members(members: Iterable[MemberLike]) -> tuple[list[str], list[str]]:
    """``(member ids, segments)`` as two columns, from pairs or objects with those attributes."""
    member_ids: list[str] = []
    segments: list[str] = []
    for member in members:
        if isinstance(member, tuple):
            member_id, segment = member
        else:
            member_id, segment = member.member_id, member.segment
        member_ids.append(member_id)
        segments.append(segment)
    return member_ids, segments


def value_problem(value: object) -> str | None:
    """Why ``value`` cannot be a member id, segment or arm id, or ``None`` when it can.

    Not a string, blank, or holding a character the id rule refuses (:mod:`schemas.text`: controls,
    invisible and bidi characters, lone surrogates). A refused character is named by code point and
    index, as that rule names it; the value itself is never echoed, since it holds the very character
    that makes it unsafe to print, and may be long.
    """
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "empty"
    match = refused_character(value)
    if match is None:
        return None
    character = match.group()
    if "\ud800" <= character <= "\udfff":
        return f"not encodable as UTF-8 (a lone surrogate, {located(match)})"
    kind = "control character" if unicodedata.category(character) == "Cc" else "invisible or bidi character"
    return f"{kind} {located(match)}"


def has_bad_characters(text: str) -> bool:
    """True when ``text`` holds a character the wire contract's rule refuses."""
    return refused_character(text) is not None


def member_problems(
    member_ids: Sequence[object],
    segments: Sequence[object],
    *,
    names: tuple[str, str] = ("member id", "segment"),
    earlier: Callable[[int], str] = lambda position: f"at members[{position}]",
) -> list[tuple[int, str]]:
    """``(position, problem)`` for every problem with the members, in position order.

    The one check of cohort members, for the Python API, cohort requests from the queue and
    ``ab-worker stratify`` files alike: each id and segment by :func:`value_problem`, then ids
    repeated (naming where the first one is, by ``earlier(position)``). ``names`` label the two
    columns in the messages. The common, clean case runs in C (sets and ``map``).
    """
    problems: list[tuple[int, str]] = []
    if not _all_clean(member_ids, segments):
        for position, member in enumerate(zip(member_ids, segments, strict=True)):
            for name, value in zip(names, member, strict=True):
                problem = value_problem(value)
                if problem:
                    problems.append((position, f"{name}: {problem}"))
    if not _all_unique(member_ids):
        problems += _duplicates(member_ids, names[0], earlier)
        problems.sort(key=lambda item: item[0])
    return problems


def _all_clean(member_ids: Sequence[object], segments: Sequence[object]) -> bool:
    """Every value a non-blank string free of refused characters, checked in C over the whole columns."""
    if not set(map(type, member_ids)) | set(map(type, segments)) <= {str}:
        return False
    ids, names = cast("Sequence[str]", member_ids), cast("Sequence[str]", segments)
    if not (all(map(str.strip, ids)) and all(map(str.strip, names))):
        return False
    # One regex pass over the joined text instead of one per value.
    return not has_bad_characters("".join(ids) + "".join(set(names)))


def _all_unique(member_ids: Sequence[object]) -> bool:
    try:
        return len(set(member_ids)) == len(member_ids)  # in C: the common case
    except TypeError:  # an unhashable id (a JSON list): reported as not a string; look for repeats one by one
        return False


def _duplicates(member_ids: Sequence[object], name: str, earlier: Callable[[int], str]) -> list[tuple[int, str]]:
    """Each repeat of a usable id, naming the first (an unusable id is reported as such already)."""
    first: dict[object, int] = {}
    found: list[tuple[int, str]] = []
    for position, member_id in enumerate(member_ids):
        if not isinstance(member_id, str) or value_problem(member_id) is not None:
            continue
        if member_id in first:
            found.append((position, f"duplicate {name} {member_id!r} (first {earlier(first[member_id])})"))
        else:
            first[member_id] = position
    return found
