"""Fixtures every layer of the suite shares: the simulated upstream and smart under
gunicorn, each started once per module (or per test) and stopped after it.

gevent must patch the standard library before anything imports requests, urllib3
or socket users; pytest plugins load earlier, so none of them may import requests.
"""

from gevent import monkey

monkey.patch_all()

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from simulator import SimulatorProcess  # noqa: E402
from tests.support import Servers  # noqa: E402

#: The module simulator unless the module says otherwise with
#: ``pytestmark = pytest.mark.simulator(...)``: fixed 20 ms answers and no failures,
#: so that every failure a test sees is one it scripted.
SIMULATOR_DEFAULTS: dict[str, object] = {"mode": "fixed", "fixed_ms": 20, "failure_rate": 0.0}


@pytest.fixture(scope="module")
def simulator(request: pytest.FixtureRequest) -> Iterator[SimulatorProcess]:
    """The module's simulated upstream, with the options of its ``simulator`` marker and,
    when the module parametrizes it (``indirect=True``), of the parameter."""
    marker = request.node.get_closest_marker("simulator")
    options = {
        **SIMULATOR_DEFAULTS,
        **(marker.kwargs if marker else {}),
        **getattr(request, "param", {}),
    }
    with SimulatorProcess(**options) as process:
        yield process


@pytest.fixture(scope="module")
def simulator_baseline(simulator: SimulatorProcess) -> dict[str, Any]:
    """The options the module's simulator started with."""
    return {k: v for k, v in simulator.config().items() if k not in ("host", "port")}


@pytest.fixture
def clean_simulator(
    simulator: SimulatorProcess, simulator_baseline: dict[str, Any]
) -> SimulatorProcess:
    """The module's simulator as it started: its options back, scripts and records gone.

    Modules whose tests reconfigure it use it everywhere:
    ``pytestmark = pytest.mark.usefixtures("clean_simulator")``.
    """
    simulator.configure(**simulator_baseline)
    simulator.reset()
    return simulator


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Servers that live as long as the module (its shared ``server`` fixtures)."""
    servers = Servers(tmp_path_factory.mktemp("servers"))
    yield servers
    servers.stop_all()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """Servers that live as long as the test."""
    started = Servers(tmp_path)
    yield started
    started.stop_all()
