"""Cohort members and the one check of their ids and segments, for the API, the queue and the files alike."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from schemas.text import refused_character


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


def _blank(value: object) -> bool:
    return not isinstance(value, str) or not value.strip()


def value_problem(value: object) -> str | None:
    """Why ``value`` cannot be a member id or segment: empty, not a string, or a character the wire
    contract's rule refuses (:mod:`schemas.text`: controls, invisible and bidi characters, lone
    surrogates), named by code point."""
    if _blank(value):
        return f"empty or non-string {value!r}"
    text = str(value)
    match = refused_character(text)
    if match is None:
        return None
    character = match.group()
    if "\ud800" <= character <= "\udfff":
        return f"not encodable as UTF-8 (a lone surrogate?) {value!r}"
    kind = "control character" if unicodedata.category(character) == "Cc" else "invisible or bidi character"
    return f"{kind} {character!r} in {value!r}"


def has_bad_characters(text: str) -> bool:
    """True when ``text`` holds a character the wire contract's rule refuses."""
    return refused_character(text) is not None


def member_problems(member_ids: Sequence[str], segments: Sequence[str]) -> list[str]:
    """Every problem with the members, by position. The common, clean case runs in C (sets and ``map``)."""
    if not member_ids:
        return ["no members: the cohort is empty"]
    problems: list[str] = []
    clean = set(map(type, member_ids)) | set(map(type, segments)) == {str}
    clean = clean and all(map(str.strip, member_ids)) and all(map(str.strip, segments))
    # One regex pass over the joined text instead of one per value; per value only on a hit.
    if not clean or has_bad_characters("".join(member_ids) + "".join(set(segments))):
        for position, (member_id, segment) in enumerate(zip(member_ids, segments, strict=True)):
            for what, value in (("member id", member_id), ("segment", segment)):
                problem = value_problem(value)
                if problem:
                    problems.append(f"members[{position}]: {what}: {problem}")
    if len(set(member_ids)) != len(member_ids):
        first: dict[str, int] = {}
        for position, member_id in enumerate(member_ids):
            if member_id in first:
                problems.append(
                    f"members[{position}]: duplicate member id {member_id!r} (first at members[{first[member_id]}])"
                )
            else:
                first[member_id] = position
    return problems
