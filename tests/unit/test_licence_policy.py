"""The licence policy of scripts/check_licenses.py, on pip-licenses entries as it
reports them (``--from=all``), without installing anything."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_licenses.py"


@pytest.fixture(scope="module")
def policy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_licenses", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def entry(expression: str = "UNKNOWN", metadata: str = "UNKNOWN", classifier: str = "UNKNOWN"):
    return {
        "Name": "example",
        "Version": "1.0",
        "License-Expression": expression,
        "License-Metadata": metadata,
        "License-Classifier": classifier,
    }


def test_certifi_is_allowed_as_mpl_whether_declared_by_metadata_or_classifier(policy):
    verdict = policy.judge(
        entry(metadata="MPL-2.0", classifier="Mozilla Public License 2.0 (MPL 2.0)")
    )
    assert verdict.problems == ()
    assert verdict.licence == "MPL-2.0"


def test_precise_metadata_names_the_licence_over_a_classifier_family(policy):
    verdict = policy.judge(entry(metadata="Apache-2.0", classifier="Apache Software License"))
    assert verdict.licence == "Apache-2.0"
    assert verdict.problems == ()


def test_a_classifier_alone_names_only_the_family(policy):
    assert policy.judge(entry(classifier="BSD License")).licence == "BSD"


def test_free_text_fields_are_mapped_explicitly(policy):
    verdict = policy.judge(entry(metadata="3-Clause BSD License"))
    assert verdict.licence == "BSD-3-Clause"
    assert verdict.problems == ()


def test_unknown_free_text_fails_until_someone_maps_it(policy):
    verdict = policy.judge(entry(metadata="Permission is hereby granted, free of charge, ..."))
    assert verdict.problems


def test_and_needs_every_licence_allowed_or_needs_one(policy):
    assert policy.judge(entry(expression="MIT AND PSF-2.0")).problems == ()
    assert policy.judge(entry(expression="MIT OR GPL-3.0-only")).problems == ()
    assert policy.judge(entry(expression="MIT AND GPL-3.0-only")).problems
    assert policy.judge(entry(expression="(MIT OR LGPL-3.0-only) AND ZPL-2.1")).problems == ()


def test_copyleft_fails_in_any_declaration(policy):
    assert policy.judge(
        entry(metadata="MIT", classifier="GNU General Public License v3 (GPLv3)")
    ).problems
    assert policy.judge(entry(metadata="LGPL-3.0-or-later")).problems


def test_a_package_must_declare_some_licence(policy):
    assert policy.judge(entry()).problems == ("declares no licence at all",)


def test_a_malformed_expression_is_reported_not_raised(policy):
    assert policy.judge(entry(expression="(MIT AND")).problems
