"""The console entry points as a user runs them: real subprocesses, real exit codes.

A wrong setting must stop the program with exit code 2 and one line naming the
file, the section and the key, before anything starts.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import rpicluster
from rpicluster.status import format_table
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
SECRET = "cli-test-secret-0123456789"

GOOD_SLAVE = f"""
[cluster]
secret = {SECRET}
[slave]
master_ip = 127.0.0.1
socket_port = 5005
roles = basic, vitals
state_dir = {{state_dir}}
"""


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rpicluster", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(tmp_path: Path, text: str, name: str = "rpicluster.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{state_dir}", str(tmp_path / "state")))
    return path


def assert_config_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (("master_ip = 127.0.0.1\n", ""), ("[slave] master_ip", "is required but missing")),
        (
            ("socket_port = 5005", "socket_port = 70000"),
            ("[slave] socket_port", "70000 is not a valid port"),
        ),
        (
            ("roles = basic, vitals", "roles = basic, turbo"),
            ("[slave] roles", "unknown role 'turbo'"),
        ),
        (
            ("[slave]", "heartbeat_interval = fast\n[slave]"),
            ("[cluster] heartbeat_interval", "'fast' is not a number"),
        ),
        (
            ("[slave]", "dead_after = 0.5\n[slave]"),
            ("[cluster] dead_after", "must be longer than suspect_after"),
        ),
        ((f"secret = {SECRET}", "secret = short"), ("[cluster] secret", "at least 16")),
        (
            ("roles = basic, vitals", "roles = no_such_module_xyz:Role"),
            ("[slave] roles", "cannot import module 'no_such_module_xyz'"),
        ),
        (
            ("roles = basic, vitals", "roles = rpicluster.config:Config"),
            ("[slave] roles", "not a subclass of rpicluster.slave.RpiBasicSlaveThread"),
        ),
        (
            ("roles = basic, vitals", "roles = rpicluster.slave:Nope"),
            ("[slave] roles", "has no class 'Nope'"),
        ),
        (("[slave]", "[slave]\n[slave]"), ("not a valid INI file",)),
    ],
    ids=[
        "missing-key",
        "port-70000",
        "unknown-role",
        "bad-number",
        "dead-before-suspect",
        "short-secret",
        "role-module-missing",
        "role-not-a-slave",
        "role-class-missing",
        "duplicate-section",
    ],
)
def test_bad_slave_config_exits_2_naming_file_section_key(tmp_path, edit, fragments):
    old, new = edit
    assert old in GOOD_SLAVE
    config = write(tmp_path, GOOD_SLAVE.replace(old, new, 1))
    result = run("slave", "--config", str(config))
    assert_config_error(result, str(config), *fragments)


def test_console_script_rpicluster_slave_exits_2_too(tmp_path):
    script = Path(sys.executable).with_name("rpicluster-slave")
    if not script.exists():
        pytest.skip("console scripts not installed in this environment")
    config = write(tmp_path, GOOD_SLAVE.replace("socket_port = 5005", "socket_port = 70000"))
    result = subprocess.run(
        [str(script), "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert_config_error(result, "[slave] socket_port", "70000")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.cfg"
    assert_config_error(run("status", "--config", str(missing)), str(missing), "file not found")


def test_unreadable_file(tmp_path):
    # A directory cannot be read as a file, even by root (chmod does not stop root).
    assert_config_error(run("slave", "--config", str(tmp_path)), str(tmp_path), "cannot read")


def test_master_without_master_section(tmp_path):
    config = write(tmp_path, GOOD_SLAVE)
    assert_config_error(run("master", "--config", str(config)), "[master]", "section is missing")


def test_slave_with_an_unusable_state_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write(tmp_path, GOOD_SLAVE.replace("{state_dir}", str(blocker / "state")))
    assert_config_error(run("slave", "--config", str(config)), "[slave] state_dir")


def test_version_of_every_entry_point():
    result = run("--version")
    assert result.returncode == 0 and rpicluster.__version__ in result.stdout
    for name in ("rpicluster-master", "rpicluster-slave"):
        script = Path(sys.executable).with_name(name)
        if script.exists():
            out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
            assert out.returncode == 0 and out.stdout.strip() == f"{name} {rpicluster.__version__}"


def test_status_when_no_master_listens(tmp_path):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = write(tmp_path, GOOD_SLAVE.replace("socket_port = 5005", f"socket_port = {port}"))
    result = run("status", "--config", str(config), "--timeout", "2")
    assert result.returncode == 1
    assert f"cannot reach the master at 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("command", [["status"], ["forget", "pi-7"]])
def test_a_query_without_a_master_to_ask_is_a_config_error(tmp_path, command):
    # Only [cluster]: nothing says where the master is, so neither command may guess.
    config = write(tmp_path, f"[cluster]\nsecret = {SECRET}\n")
    result = run(*command, "--config", str(config), "--timeout", "2")
    assert_config_error(result, str(config), "needs a [master] or a [slave] section")


def test_unknown_log_level_is_a_usage_error(tmp_path):
    result = run("status", "--log-level", "LOUD")
    assert result.returncode == 2 and "--log-level" in result.stderr


def test_table_formats_ages_missing_vitals_and_offline_nodes():
    now = 1_000_000.0
    state = {
        "master": {"hostname": "rpi-master"},
        "nodes": [
            {
                "node_id": "0b7c3d1e-7f4e-4f7a-9a39-3e9f2a1c5d11",
                "hostname": "rpi-node-02",
                "roles": ["basic"],
                "state": "dead",
                "last_seen": now - 400,
                "vitals": None,
            },
            {
                "node_id": "c0ffee00-1111-4222-8333-944455556666",
                "hostname": "rpi-node-01",
                "roles": ["basic", "vitals"],
                "state": "alive",
                "connected": False,
                "last_seen": now - 3.2,
                "vitals": {"cpu_percent": 12.345, "temperature": 48.0},
            },
        ],
    }
    lines = format_table(state, now=now).splitlines()
    assert lines[0] == "master rpi-master: 2 node(s) (1 alive, 1 dead)"
    assert lines[2].split() == [
        "rpi-node-01",
        "c0ffee00",
        "basic,vitals",
        "alive",
        "(offline)",
        "3",
        "s",
        "ago",
        "12.3",
        "48.0",
        "-",
    ]
    assert lines[3].split() == [
        "rpi-node-02",
        "0b7c3d1e",
        "basic",
        "dead",
        "6",  # 400 s: whole minutes elapsed, as the dashboard says
        "min",
        "ago",
        "-",
        "-",
        "-",
    ]


MASTER = f"""
[cluster]
secret = {SECRET}
[master]
socket_bind_ip = 127.0.0.1
socket_port = {{port}}
state_dir = {{state_dir}}
"""


def test_master_on_a_busy_port_fails_clearly(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        config = write(tmp_path, MASTER.replace("{port}", str(port)))
        result = run("master", "--config", str(config))
    assert result.returncode == 1
    assert "rpicluster-master: cannot start:" in result.stderr
    assert "Traceback" not in result.stderr


def test_master_stops_on_sigterm_with_exit_0(tmp_path):
    port_probe = socket.create_server(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    config = write(tmp_path, MASTER.replace("{port}", str(port)))
    master = subprocess.Popen(
        [sys.executable, "-m", "rpicluster", "master", "--config", str(config)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, what="master listening")
        master.send_signal(signal.SIGTERM)
        assert master.wait(10) == 0
    finally:
        if master.poll() is None:
            master.kill()
        master.communicate(timeout=5)
    assert (tmp_path / "state" / "rpicluster.db").exists()


def test_status_against_a_silent_listener_times_out_clearly(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks
        port = silent.getsockname()[1]
        config = write(tmp_path, GOOD_SLAVE.replace("socket_port = 5005", f"socket_port = {port}"))
        result = run("status", "--config", str(config), "--timeout", "0.5")
    assert result.returncode == 1
    assert f"handshake with the master at 127.0.0.1:{port} failed: timed out" in result.stderr
