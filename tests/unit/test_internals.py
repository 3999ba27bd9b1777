"""Each private urllib3/requests name smart relies on still means what it did.

One test per assumption of ``smart.upstream.internals``: after a library upgrade, the failing
test's name says which part of the transport needs a look.
"""

from __future__ import annotations

import pytest

from smart.upstream import internals


@pytest.mark.parametrize("assumption", internals.ASSUMPTIONS, ids=lambda a: a.name)
def test_installed_libraries_still_have(assumption: internals.Assumption) -> None:
    assert assumption.holds(), f"{assumption.name} no longer holds: {assumption.why}"


def test_a_broken_assumption_stops_the_worker_with_its_name(monkeypatch) -> None:
    fake = internals.Assumption("urllib3.Example._gone", "an example", lambda: False)
    monkeypatch.setattr(internals, "ASSUMPTIONS", (*internals.ASSUMPTIONS, fake))
    with pytest.raises(internals.InternalsChanged, match=r"urllib3\.Example\._gone"):
        internals.check()
