"""Identity that does not depend on hostnames (issue 9 section 1).

Many fleets leave every card's hostname at ``raspberrypi``: each slave is named by
``[slave] node_name`` (the inventory hostname), the master keeps nodes sharing a
name apart (``duplicate_name``), and a copied card (one node id on two machines at
once) is refused with ``duplicate_id`` without the two taking turns. Everything
runs against a real master on loopback with real slave threads; every slave here
runs on this one machine, so all of them share one OS hostname, as such a fleet does.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest

from rpicluster import joining
from rpicluster import protocol as p
from rpicluster.config import ConfigError, parse_config
from rpicluster.master.registry import Registry
from rpicluster.slave import RpiBasicSlaveThread
from tests.helpers import wait_for

SECRET = "names-test-secret-0123456789"
HOSTNAME = socket.gethostname()


def slave_cfg(*lines: str) -> str:
    return "\n".join(
        ["[cluster]", f"secret = {SECRET}", "[slave]", "master_ip = 10.0.0.1", *lines, ""]
    )


# --------------------------------------------------------------------- config


def test_node_name_and_groups_are_read_from_the_slave_section():
    config = parse_config(slave_cfg("node_name = pi-rack1-03", "groups = slaves, rack1"))
    assert config.slave is not None
    assert config.slave.node_name == "pi-rack1-03"
    assert config.slave.groups == ("slaves", "rack1")


def test_node_name_and_groups_are_optional():
    config = parse_config(slave_cfg("node_name =", "groups ="))
    assert config.slave is not None
    assert config.slave.node_name is None
    assert config.slave.groups == ()


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("node_name = " + "n" * 257, "node_name", "must be 1..256 characters"),
        ("node_name = pi\u202eevil", "node_name", "bidi"),
        ("groups = slaves, slaves", "groups", "names group 'slaves' twice"),
        ("groups = a\u2028b", "groups", "separator"),
        ("groups = " + ",".join(f"g{i}" for i in range(65)), "groups", "more than 64"),
        ("node_nam = pi-1", "node_nam", "did you mean node_name?"),
    ],
)
def test_bad_names_are_config_errors_naming_file_section_and_key(line, key, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config(slave_cfg(line), "/etc/rpicluster/rpicluster.cfg")
    message = str(caught.value)
    assert message.startswith(f"/etc/rpicluster/rpicluster.cfg: [slave] {key}: ")
    assert problem in message


# ------------------------------------------------------------------- registry


def test_registry_names_nodes_by_node_name_else_hostname_and_flags_shared_names():
    registry = Registry(1.0, 2.0)
    registry.register("id-1", "basic", "10.0.0.1", {"hostname": "raspberrypi"}, None)
    registry.register(
        "id-2", "basic", "10.0.0.2", {"hostname": "raspberrypi", "node_name": "pi-2"}, None
    )
    one, two = (registry.node_dict(registry.nodes[i]) for i in ("id-1", "id-2"))
    assert (one["name"], two["name"]) == ("raspberrypi", "pi-2")
    assert one["hostname"] == two["hostname"] == "raspberrypi"
    assert not one["duplicate_name"] and not two["duplicate_name"]
    # A third Pi claims the name pi-2: both are kept, both flagged.
    registry.register(
        "id-3", "basic", "10.0.0.3", {"hostname": "raspberrypi", "node_name": "pi-2"}, None
    )
    flags = {i: registry.node_dict(registry.nodes[i])["duplicate_name"] for i in registry.nodes}
    assert flags == {"id-1": False, "id-2": True, "id-3": True}
    assert [n.node_id for n in registry.find("pi-2")] == ["id-2", "id-3"]
    # One of them is renamed: the flag goes with it.
    registry.register(
        "id-3", "basic", "10.0.0.3", {"hostname": "raspberrypi", "node_name": "pi-3"}, None
    )
    assert not registry.node_dict(registry.nodes["id-2"])["duplicate_name"]
    registry.register("id-4", "basic", "10.0.0.4", {"node_name": "pi-3"}, None)
    registry.forget("id-4")
    assert not registry.node_dict(registry.nodes["id-3"])["duplicate_name"]
    assert registry.by_name == {"raspberrypi": {"id-1"}, "pi-2": {"id-2"}, "pi-3": {"id-3"}}


def test_loaded_rows_keep_names_groups_and_duplicates():
    registry = Registry(1.0, 2.0)
    rows = [
        {
            "node_id": f"id-{i}",
            "address": "10.0.0.9",
            "state": "left",
            "details": {"hostname": "raspberrypi", "node_name": name, "groups": ["slaves"]},
        }
        for i, name in enumerate(["pi-1", "pi-1", "pi-2"])
    ]
    registry.load(rows)
    docs = {i: registry.node_dict(n) for i, n in registry.nodes.items()}
    assert [d["name"] for d in docs.values()] == ["pi-1", "pi-1", "pi-2"]
    assert [d["duplicate_name"] for d in docs.values()] == [True, True, False]
    assert all(d["groups"] == ["slaves"] for d in docs.values())


# ------------------------------------------------------- a real master, loopback


def start_slave(master, node_id: str, **kwargs) -> RpiBasicSlaveThread:
    thread = RpiBasicSlaveThread(
        "127.0.0.1",
        master.port,
        secret=master.config.cluster.secret,
        node_id=node_id,
        heartbeat_interval=0.1,
        dead_after=0.6,
        reconnect_base=0.05,
        reconnect_cap=0.2,
        **kwargs,
    )
    thread.start()
    return thread


@pytest.fixture
def slaves():
    started: list[RpiBasicSlaveThread] = []
    yield started
    for thread in started:
        thread.stop()
    for thread in started:
        thread.join(5)


def nodes_by_id(master) -> dict[str, dict]:
    return {n["node_id"]: n for n in master.cluster_state()["nodes"]}


def test_same_hostname_slaves_are_told_apart_by_node_name_and_survive_a_restart(
    master_factory, slaves
):
    master = master_factory()
    for i in (1, 2, 3):
        slaves.append(
            start_slave(master, f"node-{i}", node_name=f"pi-{i}", groups=("slaves", f"rack{i}"))
        )
    slaves.append(start_slave(master, "node-4"))  # a hand-written cfg without node_name
    wait_for(lambda: len(master.registry.nodes) == 4, 10, what="four nodes joined")
    nodes = nodes_by_id(master)
    assert {i: n["name"] for i, n in nodes.items()} == {
        "node-1": "pi-1",
        "node-2": "pi-2",
        "node-3": "pi-3",
        "node-4": HOSTNAME,
    }
    assert {n["hostname"] for n in nodes.values()} == {HOSTNAME}  # one OS hostname
    assert nodes["node-2"]["groups"] == ["slaves", "rack2"]
    assert nodes["node-4"]["groups"] == []
    assert not any(n["duplicate_name"] or n["duplicate_id"] for n in nodes.values())
    # The master restarts (the slaves stopped meanwhile): the names come from its store.
    for thread in slaves:
        thread.stop()
    wait_for(
        lambda: all(n["state"] == "left" for n in master.cluster_state()["nodes"]), 10, what="left"
    )
    port, state_dir = master.port, master.config.master.state_dir
    master.stop()
    again = master_factory(port=port, state_dir=state_dir)
    reloaded = nodes_by_id(again)
    assert {i: n["name"] for i, n in reloaded.items()} == {i: n["name"] for i, n in nodes.items()}
    assert reloaded["node-2"]["groups"] == ["slaves", "rack2"]


def test_two_pis_with_one_name_are_both_kept_and_flagged(master, slaves):
    slaves.append(start_slave(master, "card-a", node_name="pi-7"))
    slaves.append(start_slave(master, "card-b", node_name="pi-7"))
    slaves.append(start_slave(master, "card-c", node_name="pi-8"))
    wait_for(lambda: len(master.registry.nodes) == 3, 10, what="three nodes joined")
    nodes = nodes_by_id(master)
    assert [nodes[i]["state"] for i in ("card-a", "card-b", "card-c")] == ["alive"] * 3
    assert [nodes[i]["duplicate_name"] for i in ("card-a", "card-b", "card-c")] == [
        True,
        True,
        False,
    ]


def test_a_copied_card_is_refused_flagged_and_does_not_flap(master, slaves, caplog, monkeypatch):
    """Two machines (two processes: two instance tokens) with one node id at once."""
    monkeypatch.setattr(joining, "DUPLICATE_ID_BACKOFF", 0.2)  # retry often, to watch
    first = start_slave(master, "copied", node_name="pi-1")
    slaves.append(first)
    wait_for(lambda: first.connected.is_set(), 10, what="the first machine joined")
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    copy = RpiBasicSlaveThread(
        "127.0.0.1",
        master.port,
        secret=master.config.cluster.secret,
        node_id="copied",
        node_name="pi-1-copy",
        heartbeat_interval=0.1,
        dead_after=0.6,
        reconnect_base=0.05,
        reconnect_cap=0.1,
    )
    copy.instance = "another-machine-token"
    started = time.monotonic()
    copy.start()
    slaves.append(copy)
    counters = master.counters
    wait_for(lambda: counters.duplicate_ids_total >= 4, 10, what="four refused attempts")
    # The copy waits DUPLICATE_ID_BACKOFF between attempts, not its 0.1 s reconnect cap.
    assert time.monotonic() - started >= 3 * 0.2
    node = nodes_by_id(master)["copied"]
    assert node["duplicate_id"] is True
    assert node["duplicate_id_address"] == "127.0.0.1"
    assert node["name"] == "pi-1"  # the holder's details, never the copy's
    assert node["state"] == "alive"
    # Stable: the holder was never replaced nor reconnected, the copy never joined.
    assert first.connected.is_set() and first.connections == 1
    assert copy.connections == 0
    assert counters.replaced_total == 0
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "rpicluster.master" and "copied SD card" in r.getMessage()
    ]
    assert len(lines) == 1, lines  # one line, however many refusals
    assert "duplicate_id" in lines[0] and "copied" in lines[0]
    assert master.master_dict()["counters"]["duplicate_ids_total"] >= 4


def test_a_restarted_slave_takes_its_id_back_and_an_old_slave_never_conflicts(master, slaves):
    """A new process of the same Pi (its old connection closed) is not a copy."""
    first = start_slave(master, "pi-r")
    wait_for(lambda: first.connected.is_set(), 10, what="joined")
    first.stop()
    first.join(5)
    second = start_slave(master, "pi-r")  # a new process: another token
    second.instance = "restarted-process"
    slaves.append(second)
    wait_for(lambda: second.connected.is_set(), 10, what="the restarted slave joined")
    # A slave that sends no instance token is never refused (it replaces, as before).
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    try:
        secret = master.config.cluster.secret
        p.client_handshake(sock, secret, kind="slave", node_id="pi-r", role="basic")
    finally:
        sock.close()
    assert master.counters.duplicate_ids_total == 0
    assert nodes_by_id(master)["pi-r"]["duplicate_id"] is False


def test_duplicate_id_flag_clears_after_the_copy_stops(monkeypatch):
    clock = [100.0]
    registry = Registry(1.0, 2.0, clock=lambda: clock[0], wall=lambda: 1e9 + clock[0])
    registry.register("x", "basic", "10.0.0.1", {"hostname": "pi"}, object(), "token-a")
    assert registry.holder("x", "token-a") is None  # the same process reconnecting
    node = registry.holder("x", "token-b")
    assert node is not None
    assert registry.flag_duplicate_id(node, "10.0.0.2") is True
    assert registry.flag_duplicate_id(node, "10.0.0.2") is False  # rate-limited
    assert registry.node_dict(node)["duplicate_id"] is True
    clock[0] += 181.0
    assert registry.node_dict(node)["duplicate_id"] is False
    assert "duplicate_id_address" not in registry.node_dict(node)
    # The holder went silent (the Pi rebooted): the id is free for the next process.
    assert registry.holder("x", "token-b") is None


def test_a_slave_built_from_its_config_sends_its_node_name_and_groups(tmp_path):
    text = slave_cfg(f"state_dir = {tmp_path}", "node_name = pi-rack1-03", "groups = slaves,rack1")
    thread = RpiBasicSlaveThread.from_config(parse_config(text, need="slave"))
    details = thread.details()
    assert details["node_name"] == "pi-rack1-03"
    assert details["groups"] == ["slaves", "rack1"]
    assert details["hostname"] == HOSTNAME  # the OS hostname stays one of the details
    bare = RpiBasicSlaveThread.from_config(parse_config(slave_cfg(f"state_dir = {tmp_path}")))
    assert "node_name" not in bare.details() and bare.details()["groups"] == []
