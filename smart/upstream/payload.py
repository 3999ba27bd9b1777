"""What counts as the upstream's answer: a strict RFC 8259 payload, an honest length.

Plain functions of bytes and header values: no sockets, no requests.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate object key")
    return obj


#: RFC 8259 parsing, stricter than ``json.loads``: that one accepts NaN and Infinity
#: and keeps the last of duplicate keys, so a payload with ``"time"`` twice would be
#: read one way here and maybe another by the client (JavaScript's JSON.parse rejects
#: NaN; other parsers keep the first duplicate).
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def is_valid_payload(body: bytes) -> bool:
    """True for a JSON object whose ``time`` is a non-negative integer (not a bool).

    RFC 8259 requires UTF-8 between systems, so anything else is rejected rather than
    guessed at, and the body can be passed through to the client byte for byte. Also
    refused: NaN and Infinity, duplicate keys (in any object), and a ``\\u`` escape of
    a lone surrogate, which is no Unicode character and which strict parsers reject.
    """
    try:
        text = body.decode("utf-8")
        payload = _STRICT.decode(text)
        if "\\" in text:
            # Surrogates can only come from \u escapes (strict UTF-8 decoding refuses
            # them raw), and a lone one cannot be encoded back: only bodies with an
            # escape pay for it. A one-character search is a memchr, ~15x cheaper than
            # searching for the two characters of the escape (bench/payload_check.py).
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeError and JSONDecodeError included
        return False
    if not isinstance(payload, dict):
        return False
    value = payload.get("time")
    return type(value) is int and value >= 0


def content_length(value: str) -> int | None:
    """The length a Content-Length header declares; None when it declares none.

    RFC 9110 section 8.6 allows ASCII digits only (``str.isdigit`` also takes "²",
    which ``int`` refuses, and ``int`` takes "1_0" and " 7"), and a list of copies of
    one value, as when the header is sent twice.
    """
    values = {item.strip() for item in value.split(",")}
    if len(values) != 1:
        return None
    (digits,) = values
    return int(digits) if digits.isascii() and digits.isdigit() else None
