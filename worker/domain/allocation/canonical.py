"""RFC 8785 JSON canonicalisation (JCS), for ``config_version`` (``docs/allocation.md`` §2.8).

JCS is chosen because every language has an implementation: keys sorted by UTF-16 code units, no
whitespace, strings escaped minimally, numbers in ECMAScript's shortest round-trip form. Only what
the digest holds is supported: dicts with string keys, lists, strings, finite numbers (serialised as
doubles), booleans and null.
"""

from __future__ import annotations

import hashlib
import json
import math


def canonical_json(value: object) -> str:
    """The JCS text of ``value``; raises ``TypeError``/``ValueError`` for anything JCS cannot hold."""
    if value is None or value is True or value is False:
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return es_number(float(value))
    if isinstance(value, list | tuple):
        return "[" + ",".join(map(canonical_json, value)) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("JCS object keys must be strings")
        keys = sorted(value, key=lambda key: key.encode("utf-16-be"))
        return (
            "{" + ",".join(f"{json.dumps(key, ensure_ascii=False)}:{canonical_json(value[key])}" for key in keys) + "}"
        )
    raise TypeError(f"JCS cannot serialise {type(value).__name__}")


def es_number(number: float) -> str:
    """ECMAScript's ``Number.prototype.toString`` for a finite double (RFC 8785 §3.2.2.3)."""
    if not math.isfinite(number):
        raise ValueError("JCS has no representation for NaN or infinity")
    if number == 0:
        return "0"  # -0 too
    sign = "-" if number < 0 else ""
    # repr gives the shortest digits that round-trip (as ECMAScript requires); only the layout differs.
    mantissa, _, exponent_text = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # The value is 0.<digits> × 10^n in ECMAScript's terms: n counts the digits before the point.
    point = len(whole) + int(exponent_text or 0) - (len(whole + fraction) - len((whole + fraction).lstrip("0")))
    digits = digits.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        exponent = n - 1
        text = (
            digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if exponent > 0 else "-") + str(abs(exponent))
        )
    return sign + text


def sha256_prefix(text: str, length: int = 16) -> str:
    """The first ``length`` lowercase hex digits of the SHA-256 of ``text`` in UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
