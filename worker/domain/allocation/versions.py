"""Semantic versions as the allocation contract reads them (``docs/allocation.md`` §2.7).

SemVer 2.0.0 precedence, with 1–3 core numbers (``1.2`` is ``1.2.0``). Hand-written: PEP 440 (what
Python's packaging libraries implement) orders pre-releases and local versions differently, and the
SemVer libraries on PyPI either refuse ``1.2`` or parse it leniently in ways another language would
not. Numbers are compared as digit strings (shorter is smaller, then character by character), which
is numeric order for strings without leading zeros and needs no big integers in any language.
"""

from __future__ import annotations

import functools

from schemas.models import MAX_VERSION_CHARS

#: A parsed version's sort key: core numbers as (length, digits), then (1,) for a release or
#: (0, identifier keys...) for a pre-release, so a pre-release sorts below its release.
VersionKey = tuple[object, ...]

_IDENTIFIER_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-")
_RELEASE = (1,)


def _is_number(text: str) -> bool:
    # isdigit() alone admits other scripts' digits and superscripts; isascii() keeps 0-9 only.
    return text.isdigit() and text.isascii() and (text == "0" or text[0] != "0")


def _is_identifier(text: str) -> bool:
    return bool(text) and _IDENTIFIER_CHARS.issuperset(text)


def _prerelease_key(identifier: str) -> tuple[object, ...] | None:
    if _is_number(identifier):
        return (0, len(identifier), identifier)
    if identifier.isdigit() or not _is_identifier(identifier):
        return None  # a numeric identifier with a leading zero, or a character outside [0-9A-Za-z-]
    return (1, identifier)


@functools.lru_cache(maxsize=4096)
def version_key(text: str) -> VersionKey | None:
    """The precedence key of a version string, or ``None`` when it is not a version. Never raises.

    Cached: a handful of app versions account for nearly every request.
    """
    if len(text) > MAX_VERSION_CHARS or not text.isascii():
        return None
    main, plus, build = text.partition("+")
    if plus and not all(map(_is_identifier, build.split("."))):
        return None
    core, dash, prerelease = main.partition("-")
    parts = core.split(".")
    if len(parts) > 3 or not all(map(_is_number, parts)):
        return None
    parts += ["0"] * (3 - len(parts))
    numbers = tuple((len(part), part) for part in parts)
    if not dash:
        return (*numbers, _RELEASE)
    identifiers = [_prerelease_key(identifier) for identifier in prerelease.split(".")]
    if None in identifiers:
        return None
    return (*numbers, (0, *identifiers))


def is_version(text: str) -> bool:
    """Whether ``text`` is a version of the contract."""
    return version_key(text) is not None


def compare_versions(left: str, right: str) -> int:
    """-1, 0 or 1 as ``left`` precedes, equals or follows ``right``; ``ValueError`` if either is not a version."""
    left_key, right_key = version_key(left), version_key(right)
    if left_key is None or right_key is None:
        raise ValueError(f"not a version: {left!r:.60}" if left_key is None else f"not a version: {right!r:.60}")
    return (left_key > right_key) - (left_key < right_key)
