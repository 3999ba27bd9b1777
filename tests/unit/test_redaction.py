"""Credentials and keys in SMART_UPSTREAM_URL never reach a log line or a trace."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from smart.config import ConfigError, Settings, redact_url
from smart.observability.logs import JsonFormatter

SECRET_URL = (
    "https://robot:s3cret%2Fpassw0rd@upstream.example:8443/api/work?api_key=k-0123456789&v=1"
)


def test_the_start_up_line_shows_the_url_with_user_password_and_query_values_masked() -> None:
    public = Settings(upstream_url=SECRET_URL).public()
    assert public["upstream_url"] == "https://***@upstream.example:8443/api/work?api_key=***&v=***"


def test_a_url_without_secrets_is_shown_as_it_is() -> None:
    assert redact_url("http://127.0.0.1:8081/api/work") == "http://127.0.0.1:8081/api/work"


def test_an_invalid_url_is_named_without_its_secrets() -> None:
    with pytest.raises(ConfigError, match="SMART_UPSTREAM_URL") as error:
        Settings(upstream_url="ftp://robot:s3cret-passw0rd@upstream.example/")
    assert "s3cret-passw0rd" not in str(error.value)


def test_secrets_in_any_part_of_a_line_are_masked_even_percent_encoded() -> None:
    formatter = JsonFormatter(secrets=Settings(upstream_url=SECRET_URL).secrets)
    try:
        raise OSError("GET /api/work?api_key=k-0123456789 failed for s3cret/passw0rd")
    except OSError:
        record = logging.LogRecord("smart", logging.ERROR, __file__, 1, "attempt", None, None)
        record.exc_info = sys.exc_info()
    record.detail = "Max retries exceeded with url: /api/work?api_key=k-0123456789"
    line = formatter.format(record)
    assert "k-0123456789" not in line and "s3cret" not in line
    assert json.loads(line)["detail"] == "Max retries exceeded with url: /api/work?api_key=***"


def test_short_values_are_not_hunted_in_free_text() -> None:
    # "1" and "robot" would garble every line; they are masked in the URL itself only.
    assert set(Settings(upstream_url=SECRET_URL).secrets) == {
        "s3cret%2Fpassw0rd",
        "s3cret/passw0rd",
        "k-0123456789",
    }
