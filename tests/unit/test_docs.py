"""The README's configuration table says what the code does."""

from __future__ import annotations

import re

from smart.config import describe
from tests.support import ROOT


def readme_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(SMART_[A-Z_]+)` \| `([^`]*)` \|", text, flags=re.M)
    return dict(rows)


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    rows = readme_rows()
    for variable, default, _doc in describe():
        assert variable in rows, f"{variable} is missing from the README's table"
        assert rows[variable] == str(default), f"{variable}: README says {rows[variable]}"


def test_the_readme_lists_no_setting_the_code_does_not_have() -> None:
    known = {variable for variable, _, _ in describe()}
    for variable in readme_rows():
        assert variable in known, f"{variable} is not a setting"
