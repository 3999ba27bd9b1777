"""SMART_UPSTREAM_CA_BUNDLE: read from the environment, checked before the first attempt."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from smart.config import ConfigError, Settings

BUNDLE = "SMART_UPSTREAM_CA_BUNDLE"


def test_the_default_is_requests_own_bundle() -> None:
    assert Settings().upstream_ca_bundle == ""


def test_a_pem_file_with_a_ca_certificate_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    settings = Settings.from_env({BUNDLE: str(path)})
    assert settings.upstream_ca_bundle == str(path)


def test_a_directory_is_accepted(tmp_path: Path) -> None:
    assert Settings.from_env({BUNDLE: str(tmp_path)}).upstream_ca_bundle == str(tmp_path)


def test_a_missing_bundle_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=BUNDLE):
        Settings.from_env({BUNDLE: str(tmp_path / "nope.pem")})


def test_a_file_without_a_certificate_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "empty.pem"
    path.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=BUNDLE):
        Settings.from_env({BUNDLE: str(path)})
