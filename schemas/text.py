"""The one rule for text in ids: which characters an id, segment or variant id may not hold.

Every surface uses this module: the wire contract's models and its JSON Schemas (as a ``pattern``),
``ABAssignmentAgent.assign_user``, ``ab-worker assign`` and ``ab-worker stratify``. Refused:

- C0 and C1 controls and DEL (U+0000–U+001F, U+007F–U+009F, so NEL U+0085 too): they end lines
  and fields in CSV, KQL, log lines and terminals;
- line and paragraph separators (U+2028, U+2029): line breaks to JavaScript and many log parsers;
- invisible formatting characters, which make two different ids look the same or reorder how the
  text around them is shown (Trojan Source): soft hyphen U+00AD, Arabic letter mark U+061C,
  Mongolian vowel separator U+180E, zero-width space/non-joiner/joiner and LRM/RLM
  (U+200B–U+200F), bidi embeddings and overrides (U+202A–U+202E), word joiner, invisible operators
  and bidi isolates (U+2060–U+206F), the byte-order mark / zero-width no-break space U+FEFF and the
  interlinear annotation characters (U+FFF9–U+FFFB);
- lone surrogates (U+D800–U+DFFF unpaired): they have no UTF-8 encoding, so they cannot be hashed.
  Free text (request context, variant metadata) is held to this last rule only: :func:`surrogate_problem`.

Everything else is allowed, including spaces, emoji (with their variation selectors and tags),
combining marks and look-alike letters. Ids are otherwise opaque: the UTF-8 bytes are hashed exactly
as given, with no Unicode normalisation, so "José" written precomposed (NFC, U+00E9) and decomposed
(NFD, ``e`` + U+0301) are two different ids and may get different variants. Publishers normalise ids
to NFC before publishing, the form nearly every system produces.
"""

from __future__ import annotations

import re

#: The refused characters as a regex character-class body. ``\\uXXXX`` escapes read the same in
#: Python's ``re`` and in ECMA-262 (JSON Schema's regex dialect, with the ``u`` flag 2020-12 asks for).
REFUSED_CLASS = (
    r"\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    r"\ud800-\udfff\ufeff\ufff9-\ufffb"
)
#: The rule as a JSON Schema ``pattern``: the whole string is free of refused characters.
ALLOWED_PATTERN = f"^[^{REFUSED_CLASS}]*$"
_REFUSED = re.compile(f"[{REFUSED_CLASS}]")


def refused_character(text: str) -> re.Match[str] | None:
    """The first refused character in ``text`` (a match with its position), or ``None``."""
    # isprintable() is False for every refused character (all are Cc, Cf, Cs, Zl or Zp), so the
    # common case is one C-level scan and the regex runs only on text that might hold one.
    if text.isprintable():
        return None
    return _REFUSED.search(text)


def character_problem(text: str) -> str | None:
    """What is wrong with ``text``'s characters (the first refused one, by code point), or ``None``."""
    match = refused_character(text)
    if match is None:
        return None
    return f"must not contain control, invisible or bidi characters (found {located(match)})"


#: Lone surrogates alone, for free text (request context, variant metadata): anything else may be
#: in it, but text with no UTF-8 encoding could not be serialised into an event or a row.
SURROGATE_CLASS = r"\ud800-\udfff"
_SURROGATE = re.compile(f"[{SURROGATE_CLASS}]")


def surrogate_problem(text: str) -> str | None:
    """The first lone surrogate in ``text`` (a JSON ``\\ud800`` escape makes one), described, or ``None``."""
    # isprintable() is False for every surrogate: the common case is one C-level scan.
    match = None if text.isprintable() else _SURROGATE.search(text)
    if match is None:
        return None
    return f"holds a lone surrogate ({located(match)}), which has no UTF-8 encoding"


def located(match: re.Match[str]) -> str:
    """A refused character named by code point and position (``U+202E at index 3``), never echoed raw.

    The text may be on its way to a log line or a terminal, and may be long: every message about a
    refused character names it this way.
    """
    return f"U+{ord(match.group()):04X} at index {match.start()}"


def text_problem(value: object, max_chars: int) -> str | None:
    """Why ``value`` cannot be an id of at most ``max_chars`` characters, or ``None`` when it can."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > max_chars:
        return f"is {len(value)} characters; the limit is {max_chars}"
    return character_problem(value)
