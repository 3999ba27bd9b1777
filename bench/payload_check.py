"""CPU per call of the payload check, strict (smart's) against plain ``json.loads``.

``python -m bench.payload_check`` times both on the same payloads in one process
(process CPU time, best of several rounds, so other processes on the box count as
little as possible) and prints microseconds per call and their ratio. The strict check
refuses NaN, Infinity, duplicate keys and lone surrogates; every attempt's 200 goes
through it once.
"""

from __future__ import annotations

import json
import time
import timeit

from smart.upstream.payload import is_valid_payload

#: Calls per round and rounds per payload: a few seconds in all.
CALLS = 100_000
ROUNDS = 5

PAYLOADS = {
    'typical {"time": 160}': b'{"time": 160}',
    "1 KiB string": b'{"time": 160, "pad": "' + b"x" * 1000 + b'"}',
    "20 keys": b'{"time": 160, ' + b", ".join(b'"k%d": %d' % (n, n) for n in range(20)) + b"}",
    "\\u escapes": b'{"time": 160, "s": "\\u00e9\\ud83d\\ude00"}',
}


def lenient(body: bytes) -> bool:
    """The check before it was strict: ``json.loads`` and the same rule on ``time``."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    value = payload.get("time") if isinstance(payload, dict) else None
    return type(value) is int and value >= 0


def per_call_us(check: object, body: bytes) -> float:
    seconds = min(
        timeit.repeat(
            lambda: check(body),  # type: ignore[operator]
            number=CALLS,
            repeat=ROUNDS,
            timer=time.process_time,
        )
    )
    return seconds / CALLS * 1e6


def main() -> None:
    print(f"{'payload':<24} {'json.loads':>11} {'strict':>8} {'ratio':>6}")
    for name, body in PAYLOADS.items():
        assert lenient(body) and is_valid_payload(body), name
        before, after = per_call_us(lenient, body), per_call_us(is_valid_payload, body)
        print(f"{name:<24} {before:>9.2f}us {after:>6.2f}us {after / before:>6.2f}")


if __name__ == "__main__":
    main()
