"""The master over real sockets on 127.0.0.1, spoken to with rpicluster.protocol."""

from __future__ import annotations

import dataclasses
import logging
import socket
import time

import pytest

from rpicluster import protocol as p
from rpicluster.master import Master
from rpicluster.master.store import StoreError
from tests.helpers import wait_for


def connect(master, secret, node_id="node-1", role="basic", kind="slave", details=None):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    welcome = p.client_handshake(
        sock, secret, kind=kind, node_id=node_id, role=role, details=details
    )
    return sock, welcome


def node_state(master, node_id):
    for node in master.cluster_state()["nodes"]:
        if node["node_id"] == node_id:
            return node
    return None


def test_slave_joins_with_details_and_heartbeats(master, cluster_secret):
    sock, welcome = connect(master, cluster_secret, details={"hostname": "pi-one", "ram": 1024})
    assert welcome["master"]["protocol"] == p.PROTOCOL_VERSION
    assert welcome["master"]["dead_after"] == master.config.cluster.dead_after
    node = node_state(master, "node-1")
    assert node["hostname"] == "pi-one"
    assert node["details"]["ram"] == 1024
    assert node["state"] == "alive" and node["connected"] is True
    assert node["roles"] == ["basic"]
    p.send_frame(sock, p.make(p.HEARTBEAT, seq=7, sent_at=time.time()))
    assert p.recv_message(sock) == {"type": p.HEARTBEAT_ACK, "seq": 7}
    sock.close()


def query(sock, qid, what, **fields):
    p.send_frame(sock, p.make(p.QUERY, id=qid, what=what, **fields))
    while True:
        message = p.recv_message(sock)
        if message["type"] == p.REPLY and message["id"] == qid:
            return message


def is_closed(sock):
    """True once the master closed ``sock`` (frames still queued are skipped)."""
    try:
        while True:
            p.recv_message(sock)
    except p.DisconnectionError:
        return True


def test_vitals_action_errors_and_node_query(master, cluster_secret):
    sock, _ = connect(master, cluster_secret, role="vitals")
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": 100.0, "cpu_percent": 12.5}))
    p.send_frame(sock, p.make(p.ACTION_ERROR, error="ValueError: bad", count=2))
    reply = query(sock, 1, "node", node_id="node-1")
    assert reply["ok"] is True
    node = reply["data"]
    assert node["vitals"] == {"ts": 100.0, "cpu_percent": 12.5}
    assert node["action_errors"] == {"vitals": {"count": 2, "last": "ValueError: bad"}}
    missing = query(sock, 2, "node", node_id="nope")
    assert missing["ok"] is False and missing["error"]["code"] == p.E_NOT_FOUND
    unknown = query(sock, 3, "weather")
    assert unknown["ok"] is False and unknown["error"]["code"] == p.E_BAD_MESSAGE
    assert query(sock, 4, "node", node_id="node-1")["ok"] is True  # still connected
    sock.close()


def test_history_is_paged_oldest_first_and_survives_restart(master_factory, cluster_secret):
    master = master_factory()
    sock, _ = connect(master, cluster_secret, role="vitals")
    base = float(int(time.time()) - 100)  # inside the history window (one hour)
    for i in range(30):
        p.send_frame(sock, p.make(p.VITALS, vitals={"ts": base + i, "load_1": i / 10}))
    first = query(sock, 1, "history", node_id="node-1", limit=20)["data"]
    assert [point["ts"] for point in first["points"]] == [base + i for i in range(20)]
    assert first["more"] is True
    rest = query(sock, 2, "history", node_id="node-1", since=first["points"][-1]["ts"])["data"]
    assert [point["ts"] for point in rest["points"]] == [base + i for i in range(20, 30)]
    assert rest["more"] is False
    bad = query(sock, 3, "history", node_id="node-1", limit=0)
    assert bad["ok"] is False and "limit" in bad["error"]["message"]
    missing = query(sock, 4, "history", node_id="ghost")
    assert missing["error"]["code"] == p.E_NOT_FOUND
    sock.close()
    port, state_dir = master.port, master.config.master.state_dir
    master.stop()
    again = master_factory(port=port, state_dir=state_dir)
    sock, _ = connect(again, cluster_secret, node_id="reader", kind="client", role="-")
    points = query(sock, 1, "history", node_id="node-1")["data"]["points"]
    assert len(points) == 30 and points[-1] == {"ts": base + 29, "load_1": 2.9}
    sock.close()


def test_cluster_query_pages_fit_in_a_frame(master_factory, cluster_secret):
    master = master_factory(cluster={"max_frame_size": 16384})
    socks = [
        connect(
            master,
            cluster_secret,
            node_id=f"n{i:02d}",
            details={f"k{j}": "x" * 225 for j in range(4)},
        )[0]
        for i in range(40)
    ]
    client, _ = connect(master, cluster_secret, node_id="status", kind="client", role="-")
    seen, offset, pages = [], 0, 0
    while offset is not None:
        data = query(client, pages + 1, "cluster", offset=offset)["data"]
        assert data["total"] == 40
        assert data["master"]["counters"]["connections_open"] == 41
        seen += [node["node_id"] for node in data["nodes"]]
        offset = data["next_offset"]
        pages += 1
    assert seen == [f"n{i:02d}" for i in range(40)]
    assert pages > 2  # 40 KB of details never fit one 16 KB frame
    data = query(client, 99, "cluster", offset=5, limit=3)["data"]
    assert [node["node_id"] for node in data["nodes"]] == ["n05", "n06", "n07"]
    assert data["next_offset"] == 8
    state = master.cluster_state()
    assert [node["node_id"] for node in state["nodes"]] == seen
    assert state["next_offset"] is None and state["total"] == 40
    for sock in socks + [client]:
        sock.close()


def test_client_connections_never_register_a_node(master, cluster_secret):
    client, _ = connect(master, cluster_secret, node_id="status", kind="client", role="-")
    data = query(client, 1, "cluster")["data"]
    assert data["nodes"] == [] and data["total"] == 0
    client.close()


def test_goodbye_is_left_and_close_without_goodbye_is_dead_at_once(master_factory, cluster_secret):
    # Long suspect_after/dead_after: a death seen long before suspect_after can only
    # come from the closed connection, not from the sweep.
    master = master_factory(cluster={"suspect_after": 15, "dead_after": 30})
    polite, _ = connect(master, cluster_secret, node_id="polite")
    rude, _ = connect(master, cluster_secret, node_id="rude")
    p.send_frame(polite, p.make(p.GOODBYE, reason="stopping"))
    wait_for(lambda: node_state(master, "polite")["state"] == "left", what="polite left")
    assert node_state(master, "polite")["connected"] is False
    rude.close()
    start = time.monotonic()
    wait_for(lambda: node_state(master, "rude")["state"] == "dead", what="rude dead")
    assert time.monotonic() - start < master.config.cluster.suspect_after
    polite.close()


def test_silent_slave_turns_suspect_then_dead_and_is_disconnected(master_factory, cluster_secret):
    # suspect lasts from 0.3 s to 3 s of silence: a poll on a loaded machine cannot miss it.
    master = master_factory(cluster={"suspect_after": 0.3, "dead_after": 3.0})
    before = time.monotonic()
    sock, _ = connect(master, cluster_secret)
    talker, _ = connect(master, cluster_secret, node_id="talker")
    wait_for(lambda: node_state(master, "node-1")["state"] == "suspect", what="suspect")
    wait_for(lambda: node_state(master, "node-1")["state"] == "dead", what="dead")
    # Order and outcome; not before dead_after (how soon after it is bench/ matter:
    # the sweep waits longer on purpose when the master itself ran late).
    assert time.monotonic() - before >= master.config.cluster.dead_after
    assert is_closed(sock)
    sock.close()
    talker.close()


def test_newest_connection_for_a_role_wins(master, cluster_secret, caplog):
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    oldest, _ = connect(master, cluster_secret)
    older, _ = connect(master, cluster_secret)
    assert p.recv_message(oldest)["code"] == p.E_REPLACED
    newer, _ = connect(master, cluster_secret)
    error = p.recv_message(older)
    assert error == {
        "type": p.ERROR,
        "code": p.E_REPLACED,
        "message": "a newer connection for node node-1 role basic took over",
    }
    assert is_closed(older)
    p.send_frame(newer, p.make(p.HEARTBEAT, seq=1, sent_at=0))
    assert p.recv_message(newer)["type"] == p.HEARTBEAT_ACK
    assert node_state(master, "node-1")["state"] == "alive"
    assert master.cluster_state()["master"]["counters"]["replaced_total"] == 2
    assert [r.getMessage() for r in caplog.records if "node-1 role basic" in r.getMessage()] == [
        f"node node-1 role basic joined from 127.0.0.1:{oldest.getsockname()[1]}",
        *(
            f"node node-1 role basic: newer connection from 127.0.0.1:{sock.getsockname()[1]}"
            " replaces the older one"
            for sock in (older, newer)
        ),
    ]
    for sock in (oldest, older, newer):
        sock.close()


def test_the_welcome_tells_the_master_without_its_counters(master, cluster_secret):
    """The welcome's master object is the short one (docs/protocol.md 8.3): who the master
    is and the cluster's timings, not the counters and node counts of a cluster reply."""
    sock, welcome = connect(master, cluster_secret)
    assert set(welcome["master"]) == {
        "hostname",
        "version",
        "protocol",
        "started_at",
        "heartbeat_interval",
        "suspect_after",
        "dead_after",
        "max_frame_size",
    }
    assert welcome["master"]["dead_after"] == master.config.cluster.dead_after
    sock.close()


def test_stop_says_goodbye_and_restart_keeps_the_fleet(master_factory, cluster_secret):
    # The grace period is dead_after from the restart: 3 s leaves a loaded machine
    # time to read the node before it ends.
    master = master_factory(cluster={"dead_after": 3.0})
    sock, _ = connect(master, cluster_secret, details={"hostname": "pi-seven"})
    port, state_dir = master.port, master.config.master.state_dir
    master.stop()
    assert p.recv_message(sock) == {"type": p.GOODBYE, "reason": "master shutting down"}
    sock.close()
    again = master_factory(port=port, state_dir=state_dir, cluster={"dead_after": 3.0})
    node = node_state(again, "node-1")
    assert node["hostname"] == "pi-seven"
    assert node["connected"] is False and node["state"] == "alive"  # grace period
    wait_for(lambda: node_state(again, "node-1")["state"] == "dead", what="grace over")
    sock, _ = connect(again, cluster_secret)
    node = node_state(again, "node-1")
    assert node["state"] == "alive" and node["connected"] is True
    sock.close()


def test_history_is_pruned_to_the_window(master_factory, cluster_secret):
    master = master_factory(master={"history_window": 60})
    sock, _ = connect(master, cluster_secret, role="vitals")
    now = time.time()
    for ts in (now - 120, now - 30, now - 1):
        p.send_frame(sock, p.make(p.VITALS, vitals={"ts": ts}))
    query(sock, 1, "node", node_id="node-1")  # the vitals are in
    port, state_dir = master.port, master.config.master.state_dir
    master.stop()  # the store prunes when it closes (and every minute)
    again = master_factory(port=port, state_dir=state_dir, master={"history_window": 60})
    client, _ = connect(again, cluster_secret, node_id="reader", kind="client", role="-")
    points = query(client, 1, "history", node_id="node-1")["data"]["points"]
    assert [point["ts"] for point in points] == [now - 30, now - 1]
    sock.close()
    client.close()


def test_unusable_state_dir_is_a_clear_error(make_config, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    config = make_config(master={"socket_bind_ip": "127.0.0.1", "state_dir": str(blocker)})
    config = dataclasses.replace(config, master=dataclasses.replace(config.master, socket_port=0))
    with pytest.raises(StoreError) as info:
        Master(config).start()
    assert "not-a-dir" in str(info.value) and "cannot open the master database" in str(info.value)


def test_busy_port_is_a_clear_error(master, master_factory):
    with pytest.raises(OSError) as info:
        master_factory(port=master.port)
    assert f"127.0.0.1:{master.port}" in str(info.value)
