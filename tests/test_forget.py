"""Retired Pis are forgotten: ``rpicluster forget`` and ``[master] forget_after``.

A real master on loopback; nodes join with the real handshake (kind ``slave``),
the command runs in-process through ``rpicluster.cli.main`` with a config file,
and what the master keeps is read back from the registry and from its SQLite file.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

import pytest

from rpicluster import cli, command
from rpicluster import protocol as p
from rpicluster.config import ConfigError, parse_config
from rpicluster.master.writequeue import Batch
from rpicluster.slave import RpiBasicSlaveThread
from tests.helpers import wait_for


def join(master, secret: str, node_id: str, hostname: str = "", role: str = "basic"):
    """A slave connection of ``node_id`` (with one vitals point), held open."""
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    details = {"hostname": hostname or node_id}
    p.client_handshake(sock, secret, kind="slave", node_id=node_id, role=role, details=details)
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": time.time(), "load_1": 0.1}))
    wait_for(lambda: master.registry.nodes.get(node_id) is not None, 5, what=f"{node_id} joined")
    return sock


def dead(master, secret: str, node_id: str, hostname: str = "") -> None:
    """A node that joined and then vanished without goodbye (state ``dead``)."""
    sock = join(master, secret, node_id, hostname)
    wait_for(lambda: master.registry.nodes[node_id].vitals is not None, 5, what="vitals in")
    sock.close()
    wait_for(lambda: master.registry.nodes[node_id].state == "dead", 5, what=f"{node_id} dead")


def forget(tmp_path: Path, master, secret: str, *argv: str) -> int:
    cfg = tmp_path / "client.cfg"
    cfg.write_text(
        f"[cluster]\nsecret = {secret}\n\n[slave]\nmaster_ip = 127.0.0.1\n"
        f"socket_port = {master.port}\n",
        encoding="utf-8",
    )
    return cli.main(["forget", "--config", str(cfg), *argv])


def rows(master, table: str, node_id: str) -> int:
    """Rows of ``node_id`` in the master's database file (read by a second connection)."""
    with sqlite3.connect(str(master.store.path)) as conn:
        query = f"SELECT COUNT(*) FROM {table} WHERE node_id = ?"
        return int(conn.execute(query, (node_id,)).fetchone()[0])


def saved(master, node_id: str) -> bool:
    return rows(master, "nodes", node_id) == 1 and rows(master, "vitals", node_id) >= 1


def test_forget_a_dead_node_by_name_removes_it_and_its_history(
    tmp_path, master, cluster_secret, capsys
):
    dead(master, cluster_secret, "id-old", hostname="pi-old")
    dead(master, cluster_secret, "id-keep", hostname="pi-keep")
    wait_for(lambda: saved(master, "id-old"), 5, what="row and history on disk")
    assert forget(tmp_path, master, cluster_secret, "pi-old") == command.EXIT_OK
    assert "forgot node pi-old (id-old), was dead" in capsys.readouterr().out
    assert "id-old" not in master.registry.nodes
    assert "id-keep" in master.registry.nodes
    state = master.cluster_state()
    assert [n["node_id"] for n in state["nodes"]] == ["id-keep"]
    assert state["master"]["counters"]["nodes_forgotten_total"] == 1
    wait_for(lambda: rows(master, "nodes", "id-old") == 0, 5, what="row deleted")
    assert rows(master, "vitals", "id-old") == 0
    assert saved(master, "id-keep")
    # Forgetting again: not known, exit 1 (remove.yml treats it as done).
    assert forget(tmp_path, master, cluster_secret, "id-old") == command.EXIT_NOT_KNOWN
    assert "not_found" in capsys.readouterr().err


def test_forgotten_node_stays_forgotten_after_a_master_restart(
    tmp_path, master_factory, cluster_secret
):
    first = master_factory()
    dead(first, cluster_secret, "gone")
    wait_for(lambda: saved(first, "gone"), 5, what="saved")
    assert forget(tmp_path, first, cluster_secret, "gone") == command.EXIT_OK
    state_dir = str(first.store.path.parent)
    first.stop()
    again = master_factory(state_dir=state_dir)
    assert "gone" not in again.registry.nodes


def test_connected_node_is_refused_unless_forced(tmp_path, master, cluster_secret, capsys):
    sock = join(master, cluster_secret, "busy", hostname="pi-busy")
    assert forget(tmp_path, master, cluster_secret, "pi-busy") == command.EXIT_CONNECTED
    assert "connected" in capsys.readouterr().err
    assert master.registry.nodes["busy"].sessions
    assert forget(tmp_path, master, cluster_secret, "pi-busy", "--force") == command.EXIT_OK
    assert "1 connection(s) closed" in capsys.readouterr().out
    message = p.recv_message(sock)
    while message["type"] != p.ERROR:  # acks of earlier frames may come first
        message = p.recv_message(sock)
    assert message["code"] == p.E_FORGOTTEN
    with pytest.raises(p.DisconnectionError):
        p.recv_message(sock)
    assert "busy" not in master.registry.nodes
    assert master.counters.connections_open == 0 or wait_for(
        lambda: master.counters.connections_open == 0, 5
    )
    assert "busy" not in master.registry.nodes  # its closing did not bring it back
    sock.close()


def test_a_name_shared_by_two_nodes_needs_the_node_id(tmp_path, master, cluster_secret, capsys):
    dead(master, cluster_secret, "twin-a", hostname="pi-twin")
    dead(master, cluster_secret, "twin-b", hostname="pi-twin")
    assert forget(tmp_path, master, cluster_secret, "pi-twin") == command.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "ambiguous" in err and "twin-a" in err and "twin-b" in err
    assert forget(tmp_path, master, cluster_secret, "twin-b") == command.EXIT_OK
    assert sorted(master.registry.nodes) == ["twin-a"]


def test_usage_and_unreachable_master(tmp_path, master, cluster_secret, capsys):
    with pytest.raises(SystemExit) as usage:
        cli.main(["forget"])
    assert usage.value.code == command.EXIT_CONFIG
    port = master.port
    master.stop()
    cfg = tmp_path / "c.cfg"
    cfg.write_text(
        f"[cluster]\nsecret = {cluster_secret}\n[slave]\nmaster_ip = 127.0.0.1\n"
        f"socket_port = {port}\n"
    )
    assert cli.main(["forget", "--config", str(cfg), "x"]) == command.EXIT_NO_MASTER
    assert cli.main(["forget", "--config", str(tmp_path / "none.cfg"), "x"]) == command.EXIT_CONFIG


def test_a_slave_connection_may_not_forget(master, cluster_secret):
    sock = join(master, cluster_secret, "meddler")
    p.send_frame(sock, p.make(p.QUERY, id=1, what="forget", node="meddler"))
    reply = p.recv_message(sock)
    while reply["type"] != p.REPLY:
        reply = p.recv_message(sock)
    assert reply["ok"] is False and reply["error"]["code"] == p.E_BAD_MESSAGE
    assert "meddler" in master.registry.nodes
    sock.close()


def test_dead_nodes_are_forgotten_after_forget_after(master_factory, cluster_secret):
    master = master_factory(master={"forget_after": 1.0})
    assert master.cluster_state()["master"]["forget_after"] == 1.0
    keep = RpiBasicSlaveThread("127.0.0.1", master.port, secret=cluster_secret, node_id="stays")
    keep.start()
    wait_for(lambda: "stays" in master.registry.nodes, 5, what="stays joined")
    dead(master, cluster_secret, "retired")
    wait_for(lambda: "retired" not in master.registry.nodes, 5, what="retired forgotten")
    wait_for(lambda: rows(master, "nodes", "retired") == 0, 5, what="its row deleted")
    assert rows(master, "vitals", "retired") == 0
    assert master.registry.nodes["stays"].state == "alive"  # connected: never forgotten
    keep.stop()
    keep.join(5)


def test_forget_after_zero_never_forgets(master_factory, cluster_secret):
    master = master_factory(master={"forget_after": 0})
    dead(master, cluster_secret, "old")
    assert master.registry.stale(0) == []
    assert master.forget_interval == 0.25 and "old" in master.registry.nodes


@pytest.mark.parametrize(
    ("value", "problem"),
    [("-1", "at least 0"), ("0.5", "longer than dead_after"), ("soon", "not a number")],
)
def test_forget_after_is_validated(value, problem):
    text = f"[cluster]\nsecret = {'s' * 16}\n[master]\nforget_after = {value}\n"
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_config(text, "m.cfg")
    assert "[master] forget_after" in str(caught.value)


def test_forget_after_default_is_a_week():
    config = parse_config(f"[cluster]\nsecret = {'s' * 16}\n[master]\n", "m.cfg")
    assert config.master is not None and config.master.forget_after == 7 * 24 * 3600


def test_store_queue_drops_a_forgotten_node_and_keeps_later_rows():
    batch = Batch()
    batch.nodes = {"a": ("a",), "b": ("b",)}
    batch.add_points([("a", 1.0, "{}"), ("b", 1.0, "{}"), ("a", 2.0, "{}")])
    batch.forget("a")
    assert list(batch.nodes) == ["b"] and [pt[0] for pt in batch.points] == ["b"]
    assert batch.point_bytes == 2 and batch.forgets == {"a"}
    # A batch that failed before the forget must not bring the node back.
    pending = Batch()
    pending.forget("x")
    pending.nodes = {"x": ("x", "rejoined")}
    older = Batch()
    older.nodes = {"x": ("x", "old"), "y": ("y",)}
    older.add_points([("x", 1.0, "{}"), ("y", 1.0, "{}")])
    pending.put_back(older)
    assert pending.nodes == {"y": ("y",), "x": ("x", "rejoined")}
    assert [pt[0] for pt in pending.points] == ["y"] and pending.forgets == {"x"}
