"""Queries and the hello at their limits (queries.py, handshake.py), over real sockets on
127.0.0.1: a node query answers with up to half a frame, and a hello's unknown kind is
quoted cut to 20 characters."""

from __future__ import annotations

import json
import socket

from rpicluster import protocol as p

SMALL_FRAME = 16384  # the smallest max_frame_size a config allows
QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}


def join(master, secret, node_id, role, kind, details=None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    p.client_handshake(
        sock,
        secret,
        kind=kind,
        node_id=node_id,
        role=role,
        details=details,
        max_frame_size=SMALL_FRAME,
    )
    return sock


def test_a_node_query_answers_with_up_to_half_a_frame_untrimmed(master_factory, cluster_secret):
    master = master_factory(cluster={**QUIET, "max_frame_size": SMALL_FRAME})
    # Details of about 6 KB: more than a third of the frame, less than half.
    details = {f"key{i:02}": "v" * 190 for i in range(32)}
    slave = join(master, cluster_secret, "n1", "basic", p.KIND_SLAVE, details)
    client = join(master, cluster_secret, "cli", "status", p.KIND_CLIENT)
    p.send_frame(client, p.make(p.QUERY, id=1, what="node", node_id="n1"))
    reply = p.recv_message(client, SMALL_FRAME)
    node = reply["data"]
    assert SMALL_FRAME // 3 < len(json.dumps(node)) <= SMALL_FRAME // 2
    assert "truncated" not in node and node["details"] == details
    slave.close()
    client.close()


def test_an_unknown_kind_is_quoted_cut_to_twenty_characters(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    challenge = p.recv_message(sock)
    kind = "k" * 30
    nonce = p.new_nonce()
    mac = p.hello_mac(cluster_secret, challenge["nonce"], nonce, kind, "n1", "basic")
    hello = {"protocol": p.PROTOCOL_VERSION, "kind": kind, "node_id": "n1", "role": "basic"}
    p.send_frame(sock, p.make(p.HELLO, **hello, nonce=nonce, mac=mac))
    assert p.recv_message(sock) == {
        "type": p.ERROR,
        "code": p.E_BAD_MESSAGE,
        "message": f"hello kind {'k' * 20!r} is neither 'slave' nor 'client'",
    }
    sock.close()
