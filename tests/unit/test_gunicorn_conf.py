"""gunicorn.conf.py takes every setting from ``Settings`` and loads nothing unpatchable."""

from __future__ import annotations

import json
import logging
import logging.config
import runpy
import subprocess
import sys

import pytest

from tests.support import ROOT

GUNICORN_CONF = ROOT / "gunicorn.conf.py"
#: Modules that must not be imported before gevent patches the worker (PITFALLS:
#: patching order): loading the config in gunicorn's master must not pull them in.
UNPATCHABLE = ("requests", "urllib3", "gevent", "flask", "smart.upstream.client", "smart.app")


def test_loading_the_config_imports_nothing_that_must_wait_for_gevents_patch() -> None:
    probe = (
        "import json, runpy, sys; runpy.run_path('gunicorn.conf.py');"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert not [m for m in UNPATCHABLE if m in loaded]


def test_every_server_knob_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SMART_BIND": "127.0.0.1:9999",
        "SMART_BACKLOG": "77",
        "SMART_WORKER_CONNECTIONS": "1234",
        "SMART_GRACEFUL_TIMEOUT_S": "7",
        "SMART_KEEPALIVE_S": "3",
        "SMART_WORKER_HEARTBEAT_S": "11",
        "SMART_LOG_LEVEL": "warning",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    conf = runpy.run_path(str(GUNICORN_CONF))
    assert conf["bind"] == "127.0.0.1:9999"
    assert (conf["backlog"], conf["worker_connections"]) == (77, 1234)
    assert (conf["graceful_timeout"], conf["keepalive"], conf["timeout"]) == (7, 3, 11)
    assert conf["loglevel"] == "warning"


def test_an_invalid_setting_stops_the_master_with_the_variables_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMART_KEEPALIVE_S", "soon")
    with pytest.raises(SystemExit, match="SMART_KEEPALIVE_S must be an integer"):
        runpy.run_path(str(GUNICORN_CONF))


def test_gunicorns_own_lines_are_the_apps_json_with_the_upstream_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "SMART_UPSTREAM_URL", "https://robot:hunter2hunter2@up.example/w?key=0123456789"
    )
    conf = runpy.run_path(str(GUNICORN_CONF))
    config = json.loads(json.dumps(conf["logconfig_dict"]))  # a copy: dictConfig edits it
    config["loggers"] = {"smart.test.gunicorn": {"handlers": ["stderr"], "propagate": False}}
    config.pop("root")
    logging.config.dictConfig(config)
    logging.getLogger("smart.test.gunicorn").error(
        "Worker failed: https://robot:hunter2hunter2@up.example/w?key=0123456789"
    )
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "Worker failed: https://robot:***@up.example/w?key=***"
    assert "hunter2hunter2" not in json.dumps(line)
