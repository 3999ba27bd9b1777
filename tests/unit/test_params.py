"""The contract's validation table for ``timeout`` and the request-id rules."""

from __future__ import annotations

import pytest

from smart.edge.params import InvalidTimeout, parse_timeout_ms, request_id_from

MAX_MS = 60_000


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], None), (["1"], 1), (["250"], 250), (["60000"], 60_000), (["0250"], 250)],
)
def test_valid_timeouts(values: list[str], expected: int | None) -> None:
    assert parse_timeout_ms(values, MAX_MS) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abc",
        "1.5",
        "-5",
        "0",
        "+5",
        " 5",
        "5 ",
        "60001",
        "1e3",
        "0x10",
        "٥",
        "５",
        "1_000",
        "9" * 5000,
        "\x00",
        "5\n",
    ],
)
def test_invalid_timeouts_name_the_parameter_and_the_rule(raw: str) -> None:
    with pytest.raises(InvalidTimeout) as caught:
        parse_timeout_ms([raw], MAX_MS)
    message = str(caught.value)
    assert "'timeout'" in message
    assert "from 1 to 60000" in message
    assert len(message) < 300


def test_a_timeout_given_twice_is_invalid_even_when_both_agree() -> None:
    with pytest.raises(InvalidTimeout, match="once"):
        parse_timeout_ms(["100", "100"], MAX_MS)


def test_a_sane_request_id_is_kept() -> None:
    assert request_id_from("abc-123_x.y") == "abc-123_x.y"


@pytest.mark.parametrize("header", [None, "", "x" * 129, "has space", "new\nline", "ünï"])
def test_anything_else_gets_a_fresh_request_id(header: str | None) -> None:
    generated = request_id_from(header)
    assert generated != header
    assert len(generated) == 32
