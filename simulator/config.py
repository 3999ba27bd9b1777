"""Options of the simulated upstream: defaults, validation, command line and environment.

Each option is ``--name`` on the command line or ``SIMULATOR_NAME`` in the environment
(the command line wins). All but host and port can also be changed at run time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from simulator.behaviours import Step

# The production upstream's mix as far as it is known: errors, junk and hangs.
DEFAULT_FAILURE_KINDS = (
    "status_500",
    "status_503",
    "status_429",
    "html",
    "bad_json",
    "wrong_type",
    "reset",
    "hang",
)
MODES = ("random", "fixed")


def _int(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and <= {maximum}"
            raise ValueError(f"must be >= {minimum}{upper}, got {value}")
        return value

    return convert


def _rate(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"must be from 0 to 1, got {value}")
    return float(value)


def _mode(value: object) -> str:
    if value not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}, got {value!r}")
    return str(value)


def _host(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be an address, got {value!r}")
    return value.strip()


def _kinds(value: object) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"must be a list of kind names, got {value!r}")
    kinds = tuple(name.strip() for name in names if name.strip())
    for name in kinds:
        Step.named(name)
    return kinds


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _seed(value: object) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _int(-(2**63))(value)


CONVERTERS: dict[str, Callable[[object], Any]] = {
    "host": _host,
    "port": _int(0, 65535),
    "mode": _mode,
    "fixed_ms": _int(0),
    "min_ms": _int(0),
    "max_ms": _int(0),
    "failure_rate": _rate,
    "failure_kinds": _kinds,
    "seed": _seed,
    "tls": _flag,
}
RUNTIME_OPTIONS = frozenset(CONVERTERS) - {"host", "port", "tls"}


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How ``/api/work`` behaves when no script says otherwise."""

    host: str = "127.0.0.1"
    port: int = 8081
    mode: str = "random"
    fixed_ms: int = 100
    min_ms: int = 100
    max_ms: int = 600
    failure_rate: float = 0.2
    failure_kinds: tuple[str, ...] = DEFAULT_FAILURE_KINDS
    seed: int | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        if self.min_ms > self.max_ms:
            raise ValueError(f"min_ms ({self.min_ms}) must not exceed max_ms ({self.max_ms})")
        if self.failure_rate > 0 and not self.failure_kinds:
            raise ValueError("failure_kinds must not be empty when failure_rate > 0")

    def updated(self, changes: Mapping[str, object], allowed: frozenset[str]) -> SimulatorConfig:
        """A copy with ``changes`` (raw values, converted here); ValueError names the option."""
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        converted: dict[str, Any] = {}
        for name, raw in changes.items():
            try:
                converted[name] = CONVERTERS[name](raw)
            except ValueError as exc:
                raise ValueError(f"{name} {exc}") from None
        return dataclasses.replace(self, **converted)

    def public(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["failure_kinds"] = list(self.failure_kinds)
        return values


_HELP = {
    "host": "address to listen on",
    "port": "port to listen on; 0 picks a free one",
    "mode": "latency model: uniform in [min-ms, max-ms], or exactly fixed-ms",
    "fixed_ms": "latency in fixed mode",
    "min_ms": "lowest latency in random mode",
    "max_ms": "highest latency in random mode",
    "failure_rate": "share of calls that fail, 0 to 1",
    "failure_kinds": "comma-separated kinds a failure is drawn from, uniformly",
    "seed": "seed of the random generator, for a reproducible sequence",
    "tls": "serve HTTPS with a certificate for 127.0.0.1 and localhost from a CA made "
    "for this run; the listening line gives the CA's PEM file as ca_path",
}


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> SimulatorConfig:
    """The configuration from the command line, then ``SIMULATOR_*``, then defaults."""
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="Simulated upstream: GET /api/work with configurable latency and faults.",
    )
    for name, text in _HELP.items():
        default = getattr(defaults, name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=name.upper(),
            help=f"{text} (env SIMULATOR_{name.upper()}, default {shown})",
        )
    args = vars(parser.parse_args(argv))
    raw: dict[str, object] = {}
    for name in CONVERTERS:
        value = args[name] if args[name] is not None else environ.get(f"SIMULATOR_{name.upper()}")
        if value is not None:
            raw[name] = value
    try:
        return defaults.updated(raw, frozenset(CONVERTERS))
    except ValueError as exc:
        parser.error(str(exc))
