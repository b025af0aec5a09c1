"""One peer's session on the master (connection.py), over real sockets on 127.0.0.1:
messages that arrive together in one read are each handled, counters add up over several
peers, refusals and failures are logged with the peer and the code, only a slave may send
vitals and action errors, and a suspect node's heartbeat makes it alive again."""

from __future__ import annotations

import logging
import select
import socket
import threading

import pytest

from rpicluster import memberdata as md
from rpicluster import protocol as p
from tests.helpers import on_loop, queued_client, read_to_the_end, wait_for

QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}


def connect(master) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    return sock


def join(master, secret, node_id="n1", role="basic", kind=p.KIND_SLAVE) -> socket.socket:
    sock = connect(master)
    p.client_handshake(sock, secret, kind=kind, node_id=node_id, role=role)
    return sock


def hello_frame(sock, secret, node_id="n1", role="basic", kind=p.KIND_SLAVE) -> bytes:
    """Read the challenge; the hello that answers it, not yet sent."""
    challenge = p.recv_message(sock)
    nonce = p.new_nonce()
    mac = p.hello_mac(secret, challenge["nonce"], nonce, kind, node_id, role)
    return p.make(
        p.HELLO,
        protocol=p.PROTOCOL_VERSION,
        kind=kind,
        node_id=node_id,
        role=role,
        nonce=nonce,
        mac=mac,
    )


def heartbeat(seq: int) -> bytes:
    return p.make(p.HEARTBEAT, seq=seq, sent_at=1.0)


def counters(master) -> dict:
    return master.cluster_state()["master"]["counters"]


def lines(caplog, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def state(master, node_id="n1") -> str:
    return next(n["state"] for n in master.cluster_state()["nodes"] if n["node_id"] == node_id)


# ------------------------------------------------- messages that arrive together


def test_a_hello_and_a_heartbeat_in_one_write_are_both_answered(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    sock = connect(master)
    sock.sendall(hello_frame(sock, cluster_secret) + heartbeat(1))
    assert p.recv_message(sock)["type"] == p.WELCOME
    assert p.recv_message(sock) == {"type": p.HEARTBEAT_ACK, "seq": 1}
    sock.close()


def test_heartbeats_in_one_write_are_each_acknowledged(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret)
    sock.sendall(heartbeat(1) + heartbeat(2) + heartbeat(3))
    assert [p.recv_message(sock) for _ in range(3)] == [
        {"type": p.HEARTBEAT_ACK, "seq": seq} for seq in (1, 2, 3)
    ]
    sock.close()


def test_refused_vitals_do_not_drop_what_follows_them(master_factory, cluster_secret, caplog):
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret)
    bad = p.make(p.VITALS, vitals={"cpu": True})
    sock.sendall(bad + bad + heartbeat(7))
    assert p.recv_message(sock) == {
        "type": p.REFUSED,
        "code": p.E_BAD_VITALS,
        "message": "vitals 'cpu': true/false is not a number",
        "count": 1,
    }
    # the second refusal falls within the notice interval: counted, not told yet
    assert p.recv_message(sock) == {"type": p.HEARTBEAT_ACK, "seq": 7}
    assert counters(master)["vitals_refused_total"] == 2
    port = sock.getsockname()[1]
    assert lines(caplog, "true/false") == [
        f"peer 127.0.0.1:{port} (node_id=n1 role=basic kind=slave):"
        " bad_vitals: vitals 'cpu': true/false is not a number"
    ]
    sock.close()


def test_a_message_that_is_not_an_object_is_refused_as_such(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret)
    body = b"[1, 2]"
    sock.sendall(p.HEADER.pack(len(body)) + body)
    assert p.recv_message(sock) == {
        "type": p.ERROR,
        "code": p.E_BAD_MESSAGE,
        "message": "frame is not a JSON object",
    }
    with pytest.raises(p.DisconnectionError):
        p.recv_message(sock)
    assert counters(master)["bad_messages_total"] == 1
    sock.close()


# ------------------------------------------------------------ counters add up


def test_goodbyes_and_closes_without_goodbye_are_counted_each(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    for node_id in ("a", "b"):
        sock = join(master, cluster_secret, node_id=node_id)
        p.send_frame(sock, p.make(p.GOODBYE, reason="done"))
        sock.close()
    for node_id in ("c", "d", "e"):
        join(master, cluster_secret, node_id=node_id).close()
    wait_for(
        lambda: (
            counters(master)["goodbyes_total"] == 2
            and counters(master)["closed_without_goodbye_total"] == 3
        ),
        what="two goodbyes and three closes counted",
    )
    assert counters(master)["connections_total"] == 5 and counters(master)["connections_open"] == 0
    assert sorted((n["node_id"], n["state"]) for n in master.cluster_state()["nodes"]) == [
        ("a", "left"),
        ("b", "left"),
        ("c", "dead"),
        ("d", "dead"),
        ("e", "dead"),
    ]


def refused(master, send: bytes, secret=None) -> dict:
    """Connect, send ``send`` (after the challenge), return the error frame."""
    sock = connect(master)
    p.recv_message(sock)  # the challenge
    sock.sendall(send)
    error = p.recv_message(sock)
    sock.close()
    return error


def test_each_kind_of_refusal_adds_to_its_own_counters(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    too_large = p.HEADER.pack(p.PREAUTH_MAX_FRAME_SIZE + 1)
    for _ in range(2):
        assert refused(master, too_large)["code"] == p.E_FRAME_TOO_LARGE
    after_frames = counters(master)
    assert (after_frames["rejected_frames_total"], after_frames["bad_messages_total"]) == (2, 0)
    wrong_version = p.make(p.HELLO, protocol=p.PROTOCOL_VERSION + 1)
    for _ in range(3):
        assert refused(master, wrong_version)["code"] == p.E_BAD_VERSION
    after_messages = counters(master)
    assert (after_messages["rejected_frames_total"], after_messages["bad_messages_total"]) == (5, 3)
    for node_id in ("x", "y"):
        sock = connect(master)
        with pytest.raises(p.ProtocolError) as error:
            p.client_handshake(
                sock, "another-secret-0123456789", kind=p.KIND_SLAVE, node_id=node_id, role="r"
            )
        assert error.value.code == p.E_AUTH_FAILED
        sock.close()
    assert counters(master)["auth_failures_total"] == 2


def test_refused_details_are_counted_each(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    for node_id in ("x", "y"):
        sock = connect(master)
        challenge = p.recv_message(sock)
        nonce = p.new_nonce()
        mac = p.hello_mac(cluster_secret, challenge["nonce"], nonce, p.KIND_SLAVE, node_id, "r")
        details = {f"k{i}": 1 for i in range(md.MAX_ITEMS + 1)}
        sock.sendall(
            p.make(
                p.HELLO,
                protocol=p.PROTOCOL_VERSION,
                kind=p.KIND_SLAVE,
                node_id=node_id,
                role="r",
                nonce=nonce,
                mac=mac,
                details=details,
            )
        )
        assert p.recv_message(sock)["code"] == p.E_BAD_DETAILS
        sock.close()
    assert counters(master)["details_refused_total"] == 2


def test_handshake_timeouts_are_counted_each(master_factory):
    master = master_factory(cluster=QUIET)
    silent = [connect(master) for _ in range(2)]
    for sock in silent:
        assert p.recv_message(sock)["type"] == p.CHALLENGE
        assert p.recv_message(sock)["code"] == p.E_HANDSHAKE_TIMEOUT
        sock.close()
    assert counters(master)["handshake_timeouts_total"] == 2


def test_a_failure_before_the_hello_is_logged_with_the_peer_alone(master_factory, caplog):
    master = master_factory(cluster=QUIET)
    sock = connect(master)
    port = sock.getsockname()[1]
    p.recv_message(sock)  # the challenge
    sock.sendall(p.HEADER.pack(0))
    assert p.recv_message(sock)["code"] == p.E_BAD_FRAME
    sock.close()
    assert lines(caplog, "; closing") == [
        f"peer 127.0.0.1:{port}: bad_frame: frame length 0 outside 1..16384 bytes; closing"
    ]


# ------------------------------------------------------- who may send what


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (p.make(p.VITALS, vitals={"cpu": 1.0}), "only a slave connection may send vitals"),
        (
            p.make(p.ACTION_ERROR, error="boom", count=1),
            "only a slave connection may send action_error",
        ),
    ],
)
def test_only_a_slave_may_report(master_factory, cluster_secret, message, why):
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret, node_id="cli", role="status", kind=p.KIND_CLIENT)
    sock.sendall(message)
    assert p.recv_message(sock) == {"type": p.ERROR, "code": p.E_BAD_MESSAGE, "message": why}
    sock.close()


def test_a_suspect_nodes_heartbeat_makes_it_alive_again(master_factory, cluster_secret):
    master = master_factory(
        cluster={"heartbeat_interval": 0.1, "suspect_after": 0.5, "dead_after": 60}
    )
    sock = join(master, cluster_secret)
    wait_for(lambda: state(master) == "suspect", what="the silent node suspect")
    sock.sendall(heartbeat(1))
    assert p.recv_message(sock) == {"type": p.HEARTBEAT_ACK, "seq": 1}
    assert state(master) == "alive"
    sock.close()


def test_a_silent_role_is_dropped_while_the_other_role_of_its_node_heartbeats(
    master_factory, cluster_secret, caplog
):
    """Each role's connection has its own last message: the heartbeating one keeps its
    session (the node stays alive), the silent one is closed once dead_after has passed."""
    master = master_factory(
        cluster={"heartbeat_interval": 0.1, "suspect_after": 1, "dead_after": 1.5}
    )
    talking = join(master, cluster_secret, role="basic")
    silent = join(master, cluster_secret, role="vitals")
    seq = 0
    while not select.select([silent], [], [], 0.1)[0]:  # the silent role hears first
        seq += 1
        talking.sendall(heartbeat(seq))
        assert p.recv_message(talking) == {"type": p.HEARTBEAT_ACK, "seq": seq}
        assert seq < 150, "the silent role was never dropped"
    assert p.recv_message(silent) == {
        "type": p.ERROR,
        "code": p.E_SILENT,
        "message": "no message for 1.5 s: node or role presumed dead",
    }
    (node,) = master.cluster_state()["nodes"]
    assert node["state"] == "alive" and node["connected"]
    assert on_loop(master, lambda: sorted(master.registry.nodes["n1"].sessions)) == ["basic"]
    assert not lines(caplog, "periodic _sweep failed")
    talking.close()
    silent.close()


def test_a_peer_that_does_not_read_its_replies_is_dropped_with_the_reason(
    master_factory, cluster_secret
):
    master = master_factory(cluster=QUIET)
    details = {f"key{i:02}": "v" * 190 for i in range(32)}  # about 6.6 KB per node
    slaves = []
    for i in range(16):
        sock = connect(master)
        p.client_handshake(
            sock, cluster_secret, kind=p.KIND_SLAVE, node_id=f"n{i}", role="basic", details=details
        )
        slaves.append(sock)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
    client.settimeout(30)
    client.connect(("127.0.0.1", master.port))
    p.client_handshake(client, cluster_secret, kind=p.KIND_CLIENT, node_id="cli", role="status")
    # About 22 MB of replies asked for, none read until every query is sent.
    client.sendall(p.make(p.QUERY, id=1, what="cluster") * 200)
    frames = []
    with pytest.raises(p.DisconnectionError):
        while True:
            frames.append(p.recv_message(client))
    *replies, last = frames
    assert last == {
        "type": p.ERROR,
        "code": p.E_BAD_MESSAGE,
        "message": "peer does not read its replies",
    }
    assert 0 < len(replies) < 200
    assert all(reply["type"] == p.REPLY and reply["ok"] for reply in replies)
    assert counters(master)["bad_messages_total"] == 1
    client.close()
    for sock in slaves:
        sock.close()


def test_a_peer_is_dropped_only_past_the_write_buffer_limit(master_factory):
    """MAX_WRITE_BUFFER bytes waiting for a peer is still allowed; one byte more is not."""
    from rpicluster.master.connection import MAX_WRITE_BUFFER, Connection

    master = master_factory(cluster=QUIET)

    class Transport:
        def __init__(self, waiting: int) -> None:
            self.waiting = waiting
            self.written: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def get_write_buffer_size(self) -> int:
            return self.waiting

        def close(self) -> None:
            self.closed = True

        def abort(self) -> None:
            self.closed = True

    def send_with(waiting: int) -> tuple[bool, list[bytes]]:
        conn = Connection(master, "127.0.0.1", "127.0.0.1:9")
        conn.transport = transport = Transport(waiting)
        conn.write = transport.write
        conn.send(b"reply")
        return bool(conn.closed and transport.closed), transport.written

    assert on_loop(master, lambda: send_with(MAX_WRITE_BUFFER)) == (False, [b"reply"])
    dropped, written = on_loop(master, lambda: send_with(MAX_WRITE_BUFFER + 1))
    assert dropped and written[0] == b"reply"
    assert p.decode_body(written[1][4:]) == {
        "type": p.ERROR,
        "code": p.E_BAD_MESSAGE,
        "message": "peer does not read its replies",
    }


@pytest.mark.parametrize("ending", ["refused", "goodbye"])
def test_a_reply_ready_after_the_connection_ended_is_not_sent(
    master_factory, cluster_secret, monkeypatch, ending
):
    """Nothing follows the end of a connection, whether the master refused the peer (its
    error is the last frame) or the peer said goodbye: a history read that comes back
    from the store's thread afterwards (the peer not reading, its connection still
    draining) is dropped."""
    from rpicluster.master import queries

    reading, release, answered = threading.Event(), threading.Event(), threading.Event()
    original = queries.read_history

    def held(*args):
        reading.set()
        release.wait(30)
        return original(*args)

    monkeypatch.setattr(queries, "read_history", held)
    master = master_factory(cluster=QUIET)
    slave = join(master, cluster_secret)
    client, conn, sent = queued_client(master, cluster_secret)
    history_done = conn._history_done

    def done(*args) -> None:
        history_done(*args)
        answered.set()

    conn._history_done = done
    client.sendall(p.make(p.QUERY, id=sent + 1, what="history", node_id="n1"))
    assert reading.wait(10), "the history read never started"
    if ending == "refused":
        client.sendall(p.encode({"type": "no-such-type"}))
        wait_for(lambda: counters(master)["bad_messages_total"] == 1, what="the peer refused")
    else:
        client.sendall(p.make(p.GOODBYE, reason="done"))
        wait_for(lambda: conn.said_goodbye, what="the goodbye read")
    release.set()
    assert answered.wait(10), "the history read never came back"

    frames = read_to_the_end(client)

    if ending == "refused":
        *frames, last = frames
        assert last["type"] == p.ERROR and last["code"] == p.E_UNKNOWN_TYPE
    assert [reply["id"] for reply in frames] == list(range(1, sent + 1))
    client.close()
    slave.close()


def test_a_clients_goodbye_ends_its_connection_quietly(master_factory, cluster_secret, caplog):
    """A client has no session to mark as heard: its goodbye just ends the connection."""
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret, node_id="cli", role="status", kind=p.KIND_CLIENT)
    sock.sendall(p.make(p.GOODBYE, reason="done"))
    assert read_to_the_end(sock) == []
    wait_for(lambda: not master.connections, what="the connection gone")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert counters(master)["connections_open"] == 0
    sock.close()
