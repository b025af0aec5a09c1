"""The master over real sockets on 127.0.0.1, spoken to with rpicluster.protocol."""

from __future__ import annotations

import socket
import time

from rpicluster import protocol as p
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
