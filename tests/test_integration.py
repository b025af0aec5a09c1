"""The slave side against the real master on 127.0.0.1: threads and real processes.

Intervals come from ``tests/conftest.py`` (heartbeat 0.1 s, suspect 0.3 s, dead
0.6 s), so every state change is awaited in tenths of a second.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from rpicluster.client import MasterClient
from rpicluster.master import Master
from rpicluster.roles import resolve
from rpicluster.slave import RpiBasicSlaveThread
from tests.conftest import TEST_CLUSTER
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent


def node_of(master: Master, node_id: str) -> Optional[dict[str, Any]]:
    for node in master.cluster_state()["nodes"]:
        if node["node_id"] == node_id:
            return node
    return None


def node_state(master: Master, node_id: str) -> Optional[str]:
    node = node_of(master, node_id)
    return node["state"] if node else None


@pytest.fixture
def start_slave(make_config, tmp_path):
    """Start role threads from a real Config; all are stopped and joined at teardown."""
    threads: list[RpiBasicSlaveThread] = []
    counter = iter(range(1000))

    def start(port: int, role: str = "basic", state_dir: Optional[str] = None, **slave: Any):
        if state_dir is None:
            state_dir = str(tmp_path / f"slave-{next(counter)}")
        secret = slave.pop("secret", None)
        config = make_config(
            secret=secret,
            slave={
                "master_ip": "127.0.0.1",
                "socket_port": port,
                "state_dir": state_dir,
                "roles": role,
                "reconnect_base": 0.05,
                "reconnect_cap": 0.3,
                **slave,
            },
        )
        thread = resolve(role, config.path).from_config(config)
        threads.append(thread)
        thread.start()
        return thread

    yield start
    for thread in threads:
        thread.stop()
    for thread in threads:
        thread.join(3)
        assert not thread.is_alive(), f"{thread.name} did not stop"


def write_slave_config(
    path: Path, port: int, state_dir: Path, roles: str, secret: str, **slave: Any
) -> Path:
    lines = ["[cluster]", f"secret = {secret}"]
    lines += [f"{key} = {value}" for key, value in TEST_CLUSTER.items()]
    lines += [
        "[slave]",
        "master_ip = 127.0.0.1",
        f"socket_port = {port}",
        f"roles = {roles}",
        f"state_dir = {state_dir}",
        "reconnect_base = 0.05",
        "reconnect_cap = 0.3",
    ]
    lines += [f"{key} = {value}" for key, value in slave.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def slave_command() -> list[str]:
    """The installed ``rpicluster-slave`` console script, as a Pi runs it."""
    script = Path(sys.executable).with_name("rpicluster-slave")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "rpicluster", "slave"]


@pytest.fixture
def slave_process(tmp_path, cluster_secret):
    """Start ``rpicluster-slave`` processes; any still running is killed at teardown."""
    processes: list[subprocess.Popen] = []

    def start(port: int, roles: str, name: str = "p", env: Optional[dict] = None, **slave: Any):
        state_dir = tmp_path / f"state-{name}"
        config = write_slave_config(
            tmp_path / f"{name}.cfg", port, state_dir, roles, cluster_secret, **slave
        )
        process = subprocess.Popen(
            [*slave_command(), "--config", str(config), "--log-level", "DEBUG"],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        node_file = state_dir / "node_id"
        wait_for(node_file.exists, what=f"{node_file} created by the slave process")
        process.node_id = wait_for(lambda: node_file.read_text().strip(), what="node id")
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)


# ------------------------------------------------------------------ threads


def test_slave_joins_with_its_details(master, start_slave):
    slave = start_slave(master.port)
    node = wait_for(lambda: node_of(master, slave.node_id), what="node registered")
    assert node["state"] == "alive" and node["connected"] is True
    assert node["roles"] == ["basic"]
    assert node["address"] == "127.0.0.1"
    details = node["details"]
    for key in ("hostname", "ram_total", "swap_total", "cpu_model", "cpu_cores", "os", "kernel"):
        assert key in details, key
    assert details["architecture"] and details["python_version"] and details["rpicluster_version"]
    assert node["hostname"] == details["hostname"]
    assert slave.master_info["hostname"] == master.cluster_state()["master"]["hostname"]


def test_heartbeats_keep_a_node_alive_past_dead_after(master, start_slave):
    began = time.monotonic()
    slave = start_slave(master.port)
    first = wait_for(lambda: node_of(master, slave.node_id), what="node registered")
    dead_after = master.config.cluster.dead_after
    later = wait_for(
        lambda: (
            (n := node_of(master, slave.node_id))["last_seen"] > first["last_seen"] + dead_after
            and n
        ),
        what="last_seen to advance past dead_after",
    )
    assert later["state"] == "alive"
    # A round trip measured within this test is no longer than the test so far.
    assert slave.last_rtt is not None and 0 <= slave.last_rtt <= time.monotonic() - began


def test_vitals_role_reports_vitals_and_history(master, start_slave, cluster_secret):
    slave = start_slave(master.port, role="vitals", vitals_interval=0.1)
    node = wait_for(
        lambda: (n := node_of(master, slave.node_id)) and n["vitals"] and n, what="vitals"
    )
    vitals = node["vitals"]
    assert node["roles"] == ["vitals"]
    for key in ("cpu_percent", "load_1", "ram_available", "swap_free", "disk_free", "uptime"):
        assert isinstance(vitals[key], (int, float)), key
    assert 0 <= vitals["cpu_percent"] <= 100 and vitals["ram_available"] > 0
    assert "temperature" in vitals  # a number on a Pi, None where no sensor exists
    with MasterClient("127.0.0.1", master.port, cluster_secret) as client:
        history = wait_for(
            lambda: len(p := client.query("history", node_id=slave.node_id)["points"]) >= 3 and p,
            what="three history points",
        )
    stamps = [point["ts"] for point in history]
    assert stamps == sorted(stamps)


def test_stop_gives_left(master, start_slave):
    slave = start_slave(master.port)
    wait_for(lambda: node_state(master, slave.node_id) == "alive", what="alive")
    slave.stop()
    slave.join(10)
    assert not slave.is_alive()
    wait_for(lambda: node_state(master, slave.node_id) == "left", what="left")


def test_every_slave_reregisters_after_a_master_restart(master_factory, start_slave):
    first = master_factory()
    slaves = [start_slave(first.port) for _ in range(3)]
    for slave in slaves:
        wait_for(lambda s=slave: node_state(first, s.node_id) == "alive", what="alive")
    port, state_dir = first.port, first.config.master.state_dir
    first.stop()
    wait_for(lambda: not any(s.connected.is_set() for s in slaves), what="links down")
    second = master_factory(port=port, state_dir=state_dir)
    for slave in slaves:
        node = wait_for(
            lambda s=slave: (n := node_of(second, s.node_id)) and n["connected"] and n,
            what=f"{slave.node_id} re-registered",
        )
        # The master registers a node alive at its hello, and it stays alive while it
        # is heard from: connected, it is never dead or left. Only a slave starved of
        # CPU for suspect_after (0.3 s here) is suspect, and its next heartbeat heals it.
        assert node["state"] in ("alive", "suspect"), node
        wait_for(
            lambda s=slave: node_state(second, s.node_id) == "alive", what=f"{slave.node_id} alive"
        )
        # The master registers at the hello, before the slave has read the welcome
        # and counted the connection: await the count rather than read it.
        wait_for(lambda s=slave: s.connections >= 2, what=f"{slave.node_id} counted its link")


class Greeter(RpiBasicSlaveThread):
    """A custom role loaded by dotted path: reports one number per interval."""

    def perform_action(self) -> None:
        self.send("vitals", vitals={"ts": time.time(), "greetings": self.connections})
        self.wait(0.1)


def test_custom_subclass_by_dotted_path(master, start_slave):
    slave = start_slave(master.port, role="tests.test_integration:Greeter")
    assert type(slave) is Greeter
    node = wait_for(
        lambda: (n := node_of(master, slave.node_id)) and n["vitals"] and n, what="greeting"
    )
    assert node["roles"] == ["tests.test_integration:Greeter"]
    assert node["vitals"]["greetings"] == 1


def test_wrong_secret_is_refused_and_retried(master, start_slave, caplog):
    caplog.set_level(logging.INFO, logger="rpicluster.slave")
    slave = start_slave(master.port, secret="not-the-cluster-secret-000")
    wait_for(
        lambda: master.cluster_state()["master"]["counters"]["auth_failures_total"] >= 2,
        what="two refused attempts",
    )
    assert slave.is_alive() and not slave.connected.is_set()
    assert node_of(master, slave.node_id) is None
    refusals = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("auth_failed" in text and "secret" in text for text in refusals), refusals


class Slow(RpiBasicSlaveThread):
    """perform_action() blocks far longer than dead_after, ignoring wait()."""

    role = "slow"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def perform_action(self) -> None:
        self.entered.set()
        self.release.wait(10)
        self.wait(None)


def test_a_slow_perform_action_keeps_the_node_alive(master, start_slave):
    slave = start_slave(master.port, role="tests.test_integration:Slow")
    wait_for(slave.entered.is_set, what="perform_action entered")
    window = 3 * master.config.cluster.dead_after
    states = []
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:  # observing a window is the point of this test
        states.append(node_state(master, slave.node_id))
        time.sleep(0.02)
    slave.release.set()
    # Were heartbeats tied to perform_action(), the node would be dead within dead_after.
    # (A momentary "suspect" on a machine stalled by other work is not what this tests.)
    assert "dead" not in states and states[-1] == "alive", states
    assert states.count("alive") >= 0.8 * len(states), states
    assert slave.connections == 1


class Failing(RpiBasicSlaveThread):
    role = "failing"

    def perform_action(self) -> None:
        raise OSError("sensor on i2c bus 1 did not answer")


def test_an_exception_in_perform_action_is_reported(master, start_slave):
    slave = start_slave(master.port, role="tests.test_integration:Failing")
    node = wait_for(
        lambda: (
            (n := node_of(master, slave.node_id))
            and n["action_errors"].get("failing", {}).get("count", 0) >= 2
            and n
        ),
        what="two action errors reported",
    )
    entry = node["action_errors"]["failing"]
    assert entry["last"] == "OSError: sensor on i2c bus 1 did not answer"
    assert node["state"] == "alive" and slave.is_alive() and slave.connections == 1


# ---------------------------------------------------------------- processes


def test_killed_slave_process_is_marked_dead_within_dead_after(master_factory, slave_process):
    # Long suspect_after/dead_after: a death seen before suspect_after can only come
    # from the kernel closing the killed process's connection, not from the sweep.
    master = master_factory(cluster={"suspect_after": 15, "dead_after": 30})
    process = slave_process(master.port, "basic")
    wait_for(lambda: node_state(master, process.node_id) == "alive", what="alive")
    process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: node_state(master, process.node_id) == "dead", what="dead")
    elapsed = time.monotonic() - killed
    assert elapsed < master.config.cluster.suspect_after, elapsed


def test_two_roles_in_one_process_and_sigterm_leaves(master, slave_process):
    process = slave_process(master.port, "basic, vitals", vitals_interval=0.1)
    node = wait_for(
        lambda: (
            (n := node_of(master, process.node_id))
            and set(n["roles"]) == {"basic", "vitals"}
            and n["vitals"]
            and n
        ),
        what="both roles joined",
    )
    assert node["state"] == "alive"
    # basic and vitals only: the slave keeps OpenSSL's libcrypto out (runner.lean_hashing).
    assert "libcrypto" not in Path(f"/proc/{process.pid}/maps").read_text()
    process.send_signal(signal.SIGTERM)
    assert process.wait(5) == 0
    assert node_state(master, process.node_id) == "left"
    _, stderr = process.communicate()
    assert "received SIGTERM" in stderr


def test_custom_role_from_the_examples_in_a_process(master, slave_process):
    process = slave_process(
        master.port,
        "basic, custom_slave:ProcessCountSlave",
        env={"PYTHONPATH": str(REPO / "examples")},
    )
    node = wait_for(
        lambda: (n := node_of(master, process.node_id)) and n["vitals"] and n,
        what="the example role's vitals",
    )
    assert set(node["roles"]) == {"basic", "processes"}
    assert node["vitals"]["processes"] > 1  # at least the test and the slave


def run_status(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rpicluster", "status", "--config", str(config), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def two_nodes(master, start_slave) -> list[RpiBasicSlaveThread]:
    slaves = [start_slave(master.port), start_slave(master.port, "vitals", vitals_interval=0.1)]
    for slave in slaves:
        wait_for(
            lambda s=slave: (n := node_of(master, s.node_id)) and n["state"] == "alive",
            what="alive",
        )
    wait_for(lambda: node_of(master, slaves[1].node_id)["vitals"], what="vitals")
    return slaves


def test_status_json_against_a_live_master(master, two_nodes, tmp_path, cluster_secret):
    config = write_slave_config(
        tmp_path / "status.cfg", master.port, tmp_path / "s", "basic", cluster_secret
    )
    result = run_status(config, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"master", "nodes"}
    ids = {node["node_id"]: node for node in document["nodes"]}
    assert set(ids) == {slave.node_id for slave in two_nodes}
    for node in ids.values():
        assert node["state"] == "alive"
        for key in ("hostname", "address", "roles", "last_seen", "connected_since", "details"):
            assert key in node, key
    assert ids[two_nodes[1].node_id]["vitals"]["cpu_percent"] >= 0


def test_status_table_against_a_live_master(master, two_nodes, tmp_path, cluster_secret):
    config = write_slave_config(
        tmp_path / "status.cfg", master.port, tmp_path / "s", "basic", cluster_secret
    )
    result = run_status(config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("master ") and "2 node(s) (2 alive)" in lines[0]
    assert lines[1].split()[:5] == ["NAME", "NODE", "ROLES", "STATE", "LAST"]
    rows = lines[2:]
    assert len(rows) == 2
    assert sorted(row.split()[1] for row in rows) == sorted(s.node_id[:8] for s in two_nodes)
    assert sorted(row.split()[2] for row in rows) == ["basic", "vitals"]
    assert all(" alive " in row and (" s ago" in row or "just now" in row) for row in rows)


def test_status_with_the_wrong_secret_fails_clearly(master, tmp_path):
    config = write_slave_config(
        tmp_path / "bad.cfg", master.port, tmp_path / "s", "basic", "some-other-secret-0000"
    )
    result = run_status(config)
    assert result.returncode == 1
    assert "refused us: auth_failed" in result.stderr
    assert "secret" in result.stderr


def test_cluster_state_follows_every_page(master, start_slave, cluster_secret):
    slaves = [start_slave(master.port) for _ in range(3)]
    for slave in slaves:
        wait_for(lambda s=slave: node_state(master, s.node_id) == "alive", what="alive")
    with MasterClient("127.0.0.1", master.port, cluster_secret) as client:
        first = client.query("cluster", offset=0, limit=1)
        paged = client.cluster_state(page_size=1)
    assert len(first["nodes"]) == 1 and first["next_offset"] == 1 and first["total"] == 3
    assert sorted(n["node_id"] for n in paged["nodes"]) == sorted(s.node_id for s in slaves)
    assert paged["master"]["hostname"]


def test_a_second_process_with_the_same_node_id_and_role_replaces_the_first(
    master, start_slave, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="rpicluster.slave")
    state_dir = str(tmp_path / "shared-state")  # same node_id file: a cloned SD card
    first = start_slave(master.port, state_dir=state_dir, reconnect_cap=5)
    wait_for(first.connected.is_set, what="first connected")
    second = start_slave(master.port, state_dir=state_dir, reconnect_cap=5)
    assert second.node_id == first.node_id
    wait_for(
        lambda: master.cluster_state()["master"]["counters"]["replaced_total"] >= 1,
        what="the older connection replaced",
    )
    wait_for(lambda: not first.connected.is_set(), what="the first slave dropped")
    # The master takes the newer connection over at its hello, before the
    # second slave has read the welcome: await it rather than read it.
    wait_for(second.connected.is_set, what="the second slave connected")
    messages = [r.getMessage() for r in caplog.records]
    assert any("master reports error replaced" in m for m in messages), messages
