"""roles.resolve(): built-in names and package.module:ClassName."""

from __future__ import annotations

import pytest

from rpicluster.config import ConfigError
from rpicluster.roles import resolve
from rpicluster.roles.vitals import VitalsSlaveThread
from rpicluster.slave import RpiBasicSlaveThread


class Mine(RpiBasicSlaveThread):
    role = "mine"


def test_builtin_roles():
    assert resolve("basic") is RpiBasicSlaveThread
    assert resolve("vitals") is VitalsSlaveThread
    webserver = resolve("webserver")
    assert issubclass(webserver, RpiBasicSlaveThread) and webserver.role_name() == "webserver"


def test_dotted_path():
    assert resolve("tests.test_slave_roles:Mine") is Mine


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("turbo", "unknown role"),
        ("nosuchpkg.mod:Class", "cannot import module 'nosuchpkg.mod'"),
        ("tests.test_slave_roles:Missing", "has no class 'Missing'"),
        ("tests.test_slave_roles:pytest", "is not a subclass"),
        ("rpicluster.config:ConfigError", "is not a subclass"),
    ],
)
def test_errors_name_slave_roles(name, problem):
    with pytest.raises(ConfigError) as caught:
        resolve(name, "/etc/rpicluster/rpicluster.cfg")
    message = str(caught.value)
    assert message.startswith("/etc/rpicluster/rpicluster.cfg: [slave] roles: ")
    assert repr(name) in message and problem in message


def test_a_module_that_raises_on_import(tmp_path, monkeypatch):
    (tmp_path / "broken_role.py").write_text("raise RuntimeError('no GPIO here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="failed to import: RuntimeError: no GPIO here"):
        resolve("broken_role:Anything")


def test_vitals_interval_from_config_or_argument(tmp_path):
    thread = VitalsSlaveThread("127.0.0.1", 9, secret="x" * 16, node_id="n", vitals_interval=0.5)
    assert thread.vitals_interval == 0.5 and thread.role_name() == "vitals"
    with pytest.raises(ValueError, match="vitals_interval must be positive"):
        VitalsSlaveThread("127.0.0.1", 9, secret="x" * 16, node_id="n", vitals_interval=0)
