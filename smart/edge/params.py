"""Parsing of what a client sends: the ``timeout`` parameter and ``X-Request-ID``.

Pure functions over strings; the HTTP edge turns ``InvalidTimeout`` into a 400.
"""

from __future__ import annotations

import re
import uuid

# ASCII digits only: str.isdigit() and int() also accept other scripts' digits
# (U+0665, ARABIC-INDIC FIVE), signs and surrounding spaces, which the contract rejects.
# Leading zeros of any number; the digits after them are bounded so int() stays cheap.
_DECIMAL = re.compile(r"0*([0-9]{1,12})")
# Echoed into logs, headers and the upstream request: keep it short and inert.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class InvalidTimeout(ValueError):
    """The ``timeout`` query parameter breaks its rule; the message says which."""


def parse_timeout_ms(values: list[str], max_timeout_ms: int) -> int | None:
    """The request's deadline in ms from every ``timeout`` value in the query string.

    None when the parameter is absent. Leading zeros are accepted ("0250" is 250):
    the value is still a decimal integer.
    """
    if not values:
        return None
    rule = f"a decimal integer number of milliseconds from 1 to {max_timeout_ms}"
    if len(values) > 1:
        raise InvalidTimeout(f"query parameter 'timeout' must be given once, as {rule}")
    raw = values[0]
    match = _DECIMAL.fullmatch(raw)
    if match is None or not 1 <= int(match.group(1)) <= max_timeout_ms:
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise InvalidTimeout(f"query parameter 'timeout' must be {rule}; got {shown!r}")
    return int(match.group(1))


def request_id_from(header: str | None) -> str:
    """The client's ``X-Request-ID`` when it is sane, else a fresh one."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex
