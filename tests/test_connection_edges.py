"""One master connection at its edges, over real sockets on 127.0.0.1: eviction from a
full unauthenticated table, the refused-notice pacing and the strike limit, the vitals
token bucket at exactly its burst, hello fields at their bounds, query fields, and the
counters and log lines each outcome leaves. Time is the master's injectable clock."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from rpicluster import protocol as p
from rpicluster.master.connection import Connection
from tests.helpers import on_loop, wait_for

QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}


class FakeClock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def master(master_factory):
    return master_factory(cluster=QUIET)


@pytest.fixture
def clock(master):
    """Freeze the master's clock where it stands: connections and registry share it."""
    fake = master.clock = master.registry.clock = FakeClock(time.monotonic())
    return fake


def join(master, secret, node_id="n1", role="basic", kind="slave", details=None):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    p.client_handshake(sock, secret, kind=kind, node_id=node_id, role=role, details=details)
    return sock


def stranger(master):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    challenge = p.recv_message(sock)
    assert challenge["type"] == p.CHALLENGE
    return sock, challenge


def counters(master):
    return master.cluster_state()["master"]["counters"]


def lines(caplog, words):
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def roundtrip(sock, seq):
    """A heartbeat and its ack: everything sent before it has been handled."""
    p.send_frame(sock, p.make(p.HEARTBEAT, seq=seq, sent_at=1.0))
    while True:
        message = p.recv_message(sock)
        if message["type"] == p.HEARTBEAT_ACK and message["seq"] == seq:
            return
        roundtrip.others.append(message)


roundtrip.others = []


def hello_frame(challenge, secret, **override):
    nonce = override.pop("nonce", None) or p.new_nonce()
    fields = {
        "protocol": p.PROTOCOL_VERSION,
        "kind": "slave",
        "node_id": "n1",
        "role": "basic",
        "nonce": nonce,
    }
    fields.update(override)
    fields["mac"] = p.hello_mac(
        secret, challenge["nonce"], nonce, fields["kind"], fields["node_id"], fields["role"]
    )
    return p.make(p.HELLO, **fields)


# -------------------------------------------------------------------- eviction


def test_a_full_unauthenticated_table_evicts_the_stale_stranger(
    master_factory, cluster_secret, caplog
):
    master = master_factory(cluster=QUIET, master={"max_unauthenticated": 1})
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    old, _ = stranger(master)
    port = old.getsockname()[1]
    new, challenge = stranger(master)  # served once the idle one is stale (admission.py)
    with pytest.raises((p.DisconnectionError, ConnectionError)):
        p.recv_message(old)
    assert counters(master)["connections_evicted_total"] == 1
    [line] = lines(caplog, "evicted")
    assert line.startswith(f"peer 127.0.0.1:{port} evicted: unauthenticated table full, waited ")
    assert line.endswith(" s on the peer, stale after 0.20 s")
    # the newcomer is served as usual
    p.send_frame(new, hello_frame(challenge, cluster_secret))
    assert p.recv_message(new)["type"] == p.WELCOME
    wait_for(lambda: counters(master)["connections_open"] == 1, what="the evicted one gone")
    old.close()
    new.close()


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name, default=None):
        return default


def test_a_connection_evicted_before_it_is_set_up_is_never_counted(master, caplog):
    conn = Connection(master, "10.1.1.1", "10.1.1.1:5")
    before = counters(master)

    def evict_then_set_up():
        master.admission.admit(conn, "10.1.1.1")
        conn.evict()
        transport = FakeTransport()
        conn.connection_made(transport)
        closed_at_once = conn.closed  # nothing may be written before connection_lost
        conn.connection_lost(None)
        return transport, closed_at_once

    transport, closed_at_once = on_loop(master, evict_then_set_up)
    assert transport.aborted and closed_at_once is True and conn.closed
    after = counters(master)
    assert after["connections_open"] == before["connections_open"]
    assert after["connections_total"] == before["connections_total"]
    assert after["connections_evicted_total"] == before["connections_evicted_total"] + 1
    assert conn not in master.connections
    assert master.admission.open == 0 and master.admission.pending == 0
    # Evicted by admit() itself (the table full although no room was made): it says so.
    assert lines(caplog, "evicted") == [
        "peer 10.1.1.1:5 evicted: unauthenticated table full,"
        " oldest of the address holding the most"
    ]


# ------------------------------------------------------ refusals and strikes


def bad_action_error(sock, count=1):
    for _ in range(count):
        p.send_frame(sock, p.make(p.ACTION_ERROR, error="x", count=-1))


def notices(sock, seq):
    roundtrip.others = []
    roundtrip(sock, seq)
    return [m for m in roundtrip.others if m["type"] == p.REFUSED]


def test_refused_notices_come_at_most_once_a_second_with_the_count(
    master, clock, cluster_secret, caplog
):
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    sock = join(master, cluster_secret)
    bad_action_error(sock, 3)
    assert notices(sock, 1) == [
        {
            "type": p.REFUSED,
            "code": p.E_BAD_ACTION_ERROR,
            "message": "action_error count must be >= 0",
            "count": 1,
        }
    ]
    clock.now += 0.999
    bad_action_error(sock)
    assert notices(sock, 2) == []
    clock.now += 0.001  # exactly a second after the last notice
    bad_action_error(sock)
    assert [n["count"] for n in notices(sock, 3)] == [4]
    logged = lines(caplog, "action_error count must be >= 0")
    assert len(logged) == 2
    port = sock.getsockname()[1]
    assert logged[0] == (
        f"peer 127.0.0.1:{port} (node_id=n1 role=basic kind=slave):"
        " bad_action_error: action_error count must be >= 0"
    )
    sock.close()


def test_more_than_400_strikes_close_the_connection(master, clock, cluster_secret):
    sock = join(master, cluster_secret)
    bad_action_error(sock, 400)
    roundtrip(sock, 1)  # 400 strikes: still open
    clock.now += 1.0  # 20 strikes drained
    bad_action_error(sock, 20)
    roundtrip(sock, 2)
    bad_action_error(sock, 1)
    roundtrip.others = []
    error = None
    while error is None:
        message = p.recv_message(sock)
        if message["type"] == p.ERROR:
            error = message
    assert error == {
        "type": p.ERROR,
        "code": p.E_RATE_EXCEEDED,
        "message": "too many refused messages (bad_action_error: action_error count must be >= 0)",
    }
    with pytest.raises(p.DisconnectionError):
        while True:
            p.recv_message(sock)
    assert counters(master)["bad_messages_total"] == 1
    sock.close()


def test_the_vitals_bucket_holds_exactly_40_and_refills_20_a_second(master, clock, cluster_secret):
    sock = join(master, cluster_secret, role="vitals")
    for i in range(40):
        p.send_frame(sock, p.make(p.VITALS, vitals={"ts": 1000.0 + i, "cpu": 1.0}))
    assert notices(sock, 1) == []
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": 2000.0, "cpu": 1.0}))
    refused = notices(sock, 2)
    assert refused == [
        {
            "type": p.REFUSED,
            "code": p.E_VITALS_RATE,
            "message": "more than 20 vitals reports a second (burst 40) for this node and role",
            "count": 1,
        }
    ]
    assert counters(master)["vitals_rate_limited_total"] == 1
    clock.now += 0.05  # one token back
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": 3000.0, "cpu": 2.0}))
    roundtrip(sock, 3)
    node = master.cluster_state()["nodes"][0]
    assert node["vitals"] == {"ts": 3000.0, "cpu": 2.0}
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": 4000.0, "cpu": 3.0}))
    roundtrip(sock, 4)
    assert counters(master)["vitals_rate_limited_total"] == 2
    assert master.cluster_state()["nodes"][0]["vitals"]["ts"] == 3000.0
    sock.close()


def test_bad_vitals_are_counted_and_refused_by_their_fault(master, cluster_secret):
    sock = join(master, cluster_secret, role="vitals")
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": 1.0, "x" * 100: 1}))
    refused = notices(sock, 1)
    assert len(refused) == 1 and refused[0]["code"] == p.E_BAD_VITALS
    assert counters(master)["vitals_refused_total"] == 1
    assert master.cluster_state()["nodes"][0]["vitals"] is None
    sock.close()


def test_a_heartbeat_off_the_hot_path_is_a_bad_message(master, cluster_secret):
    sock = join(master, cluster_secret)
    p.send_frame(sock, p.make(p.HEARTBEAT, seq=True, sent_at=1.0))
    error = p.recv_message(sock)
    assert (error["code"], error["message"]) == (
        p.E_BAD_MESSAGE,
        "heartbeat message needs field 'seq' of type int",
    )
    sock.close()


def test_action_errors_are_stored_cleaned(master, cluster_secret):
    sock = join(master, cluster_secret)
    p.send_frame(sock, p.make(p.ACTION_ERROR, error="disk\x00 full", count=0))
    roundtrip(sock, 1)
    node = master.cluster_state()["nodes"][0]
    assert node["action_errors"]["basic"]["count"] == 0
    assert "\x00" not in node["action_errors"]["basic"]["last"]
    sock.close()


# ----------------------------------------------------------- leaving counters


def test_leaving_is_counted_and_logged_by_how(master, cluster_secret, caplog):
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    polite = join(master, cluster_secret, "polite")
    rude = join(master, cluster_secret, "rude")
    p.send_frame(polite, p.make(p.GOODBYE, reason="bye"))
    rude.close()
    wait_for(
        lambda: (
            counters(master)["goodbyes_total"] == 1
            and counters(master)["closed_without_goodbye_total"] == 1
        ),
        what="both counted",
    )
    assert "node polite role basic said goodbye (left)" in lines(caplog, "said goodbye")
    assert "node rude role basic closed its connection without goodbye (dead)" in lines(
        caplog, "without goodbye"
    )
    wait_for(lambda: counters(master)["connections_open"] == 0, what="both closed")
    polite.close()


# ------------------------------------------------------------- hello fields


@pytest.mark.parametrize(("length", "ok"), [(15, False), (16, True), (128, True), (129, False)])
def test_the_hello_nonce_is_16_to_128_characters(master, cluster_secret, length, ok):
    sock, challenge = stranger(master)
    p.send_frame(sock, hello_frame(challenge, cluster_secret, nonce="a" * length))
    answer = p.recv_message(sock)
    if ok:
        assert answer["type"] == p.WELCOME
    else:
        assert (answer["code"], answer["message"]) == (
            p.E_BAD_MESSAGE,
            "hello nonce must be 16..128 printable characters",
        )
    sock.close()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"kind": "robot"}, "hello kind 'robot' is neither 'slave' nor 'client'"),
        ({"node_id": ""}, "hello node_id must be 1..128 printable characters"),
        ({"role": "r\x01"}, "hello role must be 1..64 printable characters"),
        ({"details": [1]}, "hello details must be a JSON object"),
    ],
)
def test_hello_fields_are_named_when_wrong(master, cluster_secret, override, message):
    from rpicluster import memberdata as md

    message = message.replace("128", str(md.MAX_NODE_ID)).replace("64", str(md.MAX_ROLE))
    sock, challenge = stranger(master)
    p.send_frame(sock, hello_frame(challenge, cluster_secret, **override))
    answer = p.recv_message(sock)
    assert (answer["code"], answer["message"]) == (p.E_BAD_MESSAGE, message)
    assert counters(master)["bad_messages_total"] == 1
    sock.close()


def test_a_hello_without_mac_names_the_peer_in_the_log(master, caplog):
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    sock, _ = stranger(master)
    p.send_frame(
        sock,
        p.make(p.HELLO, protocol=2, kind="slave", node_id="x" * 300, role="basic", nonce="n"),
    )
    answer = p.recv_message(sock)
    assert answer["code"] == p.E_AUTH_FAILED
    assert answer["message"] == "hello carries no mac: the peer has no cluster secret"
    logged = lines(caplog, "hello carries no mac")
    assert len(logged) == 1
    assert f"(node_id='{'x' * 128}' role='basic')" in logged[0]
    assert counters(master)["auth_failures_total"] == 1
    sock.close()


def test_a_first_frame_that_is_not_json_says_first(master):
    sock, _ = stranger(master)
    p.send_frame(sock, p.HEADER.pack(3) + b"{no")
    answer = p.recv_message(sock)
    assert answer["code"] == p.E_BAD_FRAME
    assert answer["message"].startswith("first frame is not UTF-8 JSON")
    assert counters(master)["rejected_frames_total"] == 1
    assert counters(master)["bad_messages_total"] == 0
    sock.close()


@pytest.mark.parametrize(
    ("frame", "shown"),
    [
        (p.make(p.GOODBYE, reason="x" * 50), "'goodbye'"),
        (p.make("z" * 60), repr("z" * 40)),
        (p.HEADER.pack(2) + b"[]", "no hello"),
    ],
)
def test_a_first_message_that_is_not_a_hello_is_named(master, frame, shown):
    sock, _ = stranger(master)
    sock.sendall(frame)
    answer = p.recv_message(sock)
    assert answer["message"] == f"expected a hello message first, got {shown}"
    sock.close()


def test_a_hello_of_another_version_shows_it_cut_to_20_characters(master, cluster_secret):
    sock, challenge = stranger(master)
    p.send_frame(sock, hello_frame(challenge, cluster_secret, protocol="v" * 40))
    answer = p.recv_message(sock)
    assert answer["code"] == p.E_BAD_VERSION
    assert answer["message"] == (
        f'peer speaks protocol "{"v" * 19}, this master speaks 2 (a JSON integer)'
    )
    sock.close()


# ------------------------------------------------------------------ queries


def query(sock, qid, what, **fields):
    p.send_frame(sock, p.make(p.QUERY, id=qid, what=what, **fields))
    while True:
        message = p.recv_message(sock)
        if message["type"] == p.REPLY and message["id"] == qid:
            return message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offset": -1}, "query field 'offset' must be a whole number >= 0"),
        ({"offset": True}, "query field 'offset' must be a whole number >= 0"),
        ({"offset": 1.0}, "query field 'offset' must be a whole number >= 0"),
        ({"limit": 0}, "query field 'limit' must be a whole number >= 1"),
    ],
)
def test_cluster_query_fields_are_checked(master, cluster_secret, fields, message):
    sock = join(master, cluster_secret, kind="client")
    reply = query(sock, 1, "cluster", **fields)
    assert reply["ok"] is False
    assert reply["error"] == {"code": p.E_BAD_MESSAGE, "message": message}
    assert counters(master)["failed_queries_total"] == 1
    sock.close()


def test_cluster_query_pages_by_offset_and_limit(master, cluster_secret):
    slaves = [join(master, cluster_secret, f"n{i}") for i in range(3)]
    sock = join(master, cluster_secret, kind="client")
    first = query(sock, 1, "cluster", limit=2)["data"]
    assert [n["node_id"] for n in first["nodes"]] == ["n0", "n1"]
    assert first["total"] == 3 and first["next_offset"] == 2
    rest = query(sock, 2, "cluster", offset=2, limit=1)["data"]
    assert [n["node_id"] for n in rest["nodes"]] == ["n2"] and rest["next_offset"] is None
    past = query(sock, 3, "cluster", offset=3)["data"]
    assert past["nodes"] == [] and past["next_offset"] is None
    for slave in slaves + [sock]:
        slave.close()


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({}, p.E_BAD_MESSAGE, "query history needs a string field 'node_id'"),
        ({"node_id": "nobody"}, p.E_NOT_FOUND, "no node 'nobody'"),
        (
            {"node_id": "n1", "since": True},
            p.E_BAD_MESSAGE,
            "query history field 'since' must be a number",
        ),
        (
            {"node_id": "n1", "since": "yesterday"},
            p.E_BAD_MESSAGE,
            "query history field 'since' must be a number",
        ),
        ({"node_id": "n1", "limit": 1001}, p.E_BAD_MESSAGE, "query field 'limit' must be 1..1000"),
        ({"node_id": "n1", "limit": 0}, p.E_BAD_MESSAGE, "query field 'limit' must be a whole"),
    ],
)
def test_history_query_fields_are_checked(master, cluster_secret, fields, code, message):
    slave = join(master, cluster_secret)
    sock = join(master, cluster_secret, kind="client")
    reply = query(sock, 1, "history", **fields)
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert reply["error"]["message"].startswith(message)
    slave.close()
    sock.close()


def test_history_query_takes_exactly_1000_and_a_since(master, cluster_secret):
    slave = join(master, cluster_secret, role="vitals")
    now = round(time.time())  # points older than the history window would be pruned
    for ts in (now, now + 1, now + 2):
        p.send_frame(slave, p.make(p.VITALS, vitals={"ts": ts}))
    roundtrip(slave, 1)
    sock = join(master, cluster_secret, kind="client")
    reply = query(sock, 1, "history", node_id="n1", limit=1000)
    assert reply["ok"] is True
    assert [pt["ts"] for pt in reply["data"]["points"]] == [now, now + 1, now + 2]
    assert reply["data"] == {"node_id": "n1", "points": reply["data"]["points"], "more": False}
    after = query(sock, 2, "history", node_id="n1", since=now, limit=1)["data"]
    assert [pt["ts"] for pt in after["points"]] == [now + 1] and after["more"] is True
    slave.close()
    sock.close()


def test_node_and_unknown_queries(master, cluster_secret):
    slave = join(master, cluster_secret, details={"hostname": "pi-1"})
    sock = join(master, cluster_secret, kind="client")
    node = query(sock, 1, "node", node_id="n1")
    assert node["ok"] is True and node["data"]["hostname"] == "pi-1"
    assert query(sock, 2, "node")["error"] == {
        "code": p.E_BAD_MESSAGE,
        "message": "query node needs a string field 'node_id'",
    }
    assert query(sock, 3, "node", node_id="x" * 300)["error"] == {
        "code": p.E_NOT_FOUND,
        "message": f"no node {'x' * 128!r}",
    }
    assert query(sock, 4, "w" * 50)["error"] == {
        "code": p.E_BAD_MESSAGE,
        "message": f"unknown query {'w' * 40!r} (known: cluster, node, history, forget)",
    }
    assert counters(master)["failed_queries_total"] == 3
    slave.close()
    sock.close()


def test_a_history_read_that_fails_is_an_internal_reply(master, cluster_secret, caplog):
    slave = join(master, cluster_secret)
    sock = join(master, cluster_secret, kind="client")

    def broken_read(fn, done):
        done(RuntimeError("disk gone"))

    master.store.read = broken_read
    reply = query(sock, 7, "history", node_id="n1")
    assert reply == {
        "type": p.REPLY,
        "id": 7,
        "ok": False,
        "error": {"code": p.E_INTERNAL, "message": "history could not be read"},
    }
    assert counters(master)["failed_queries_total"] == 1
    assert lines(caplog, "could not be read") == ["history of node n1 could not be read: disk gone"]
    assert query(sock, 8, "history", node_id="n1")["ok"] is False
    assert counters(master)["failed_queries_total"] == 2
    slave.close()
    sock.close()


class RecordingTransport(FakeTransport):
    """A transport that keeps what is written and says who the peer is."""

    def __init__(self, peer) -> None:
        super().__init__()
        self.peer = peer
        self.written = b""
        self.closed = False

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_connection_without_an_address_takes_the_transports_peer(master):
    conn = Connection(master)
    transport = RecordingTransport(("10.3.3.3", 4444))
    before = counters(master)
    on_loop(master, lambda: (master.admission.admit(conn, ""), conn.connection_made(transport)))
    assert (conn.address, conn.peer) == ("10.3.3.3", "10.3.3.3:4444")
    challenge = p.decode_body(transport.written[4:])
    assert challenge["type"] == p.CHALLENGE and challenge["nonce"] == conn.nonce
    assert challenge["max_frame_size"] == master.config.cluster.max_frame_size
    after = counters(master)
    assert after["connections_total"] == before["connections_total"] + 1
    assert after["connections_open"] == before["connections_open"] + 1
    on_loop(master, lambda: conn.connection_lost(None))
    assert counters(master)["connections_open"] == before["connections_open"]
    assert conn not in master.connections and conn.timer.cancelled()


def test_a_connection_from_an_unknown_peer_keeps_its_placeholder(master):
    conn = Connection(master)
    transport = RecordingTransport(None)  # e.g. a UNIX socket: no (host, port)
    on_loop(master, lambda: (master.admission.admit(conn, ""), conn.connection_made(transport)))
    assert (conn.address, conn.peer) == ("", "?")
    on_loop(master, lambda: conn.connection_lost(None))


def test_a_socket_without_tcp_options_is_served_all_the_same(master):
    """TCP_NODELAY is a speed-up: a socket that refuses it (not TCP) is served anyway."""
    conn = Connection(master, "10.5.5.5", "10.5.5.5:1")
    refusing, other_end = socket.socketpair()  # AF_UNIX: no TCP_NODELAY

    class UnixTransport(RecordingTransport):
        def get_extra_info(self, name, default=None):
            return refusing if name == "socket" else default

    transport = UnixTransport(None)
    try:
        on_loop(master, lambda: (master.admission.admit(conn, ""), conn.connection_made(transport)))
        assert p.decode_body(transport.written[4:])["type"] == p.CHALLENGE
        on_loop(master, lambda: conn.connection_lost(None))
    finally:
        refusing.close()
        other_end.close()


def test_replies_are_not_delayed_by_nagle(master, cluster_secret):
    sock = join(master, cluster_secret)
    conn = next(iter(master.connections))
    server_side = conn.transport.get_extra_info("socket")
    assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    sock.close()


# ------------------------------------------------ what the first mutation run found


def test_every_eviction_is_counted(master_factory):
    master = master_factory(cluster=QUIET, master={"max_unauthenticated": 1})
    socks = [stranger(master)[0] for _ in range(3)]
    wait_for(lambda: counters(master)["connections_evicted_total"] == 2, what="two evictions")
    for sock in socks:
        sock.close()


def test_an_evicted_connection_writes_nothing_more(master):
    conn = Connection(master)
    transport = RecordingTransport(("10.4.4.4", 1))
    on_loop(master, lambda: (master.admission.admit(conn, ""), conn.connection_made(transport)))
    sent = len(transport.written)
    on_loop(master, conn.evict)
    assert transport.aborted and conn.closed
    on_loop(master, lambda: conn.close(p.E_BAD_MESSAGE, "too late"))
    assert len(transport.written) == sent
    on_loop(master, lambda: conn.connection_lost(None))


def test_a_hello_without_mac_cuts_a_long_role_to_40_characters(master, caplog):
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    sock, _ = stranger(master)
    p.send_frame(
        sock, p.make(p.HELLO, protocol=2, kind="slave", node_id="n", role="r" * 60, nonce="n")
    )
    p.recv_message(sock)
    assert f"(node_id='n' role='{'r' * 40}')" in lines(caplog, "hello carries no mac")[0]
    sock.close()


def test_a_copied_card_is_refused_and_named_in_one_log_line(master, cluster_secret, caplog):
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    first = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    p.client_handshake(
        first,
        cluster_secret,
        kind="slave",
        node_id="n1",
        role="basic",
        details={"hostname": "pi-a"},
        instance="process-a",
    )
    copies = []
    for hostname in ("pi-b", None):
        copy = socket.create_connection(("127.0.0.1", master.port), timeout=5)
        details = {"hostname": hostname} if hostname else {}
        with pytest.raises(p.ProtocolError) as info:
            p.client_handshake(
                copy,
                cluster_secret,
                kind="slave",
                node_id="n1",
                role="basic",
                details=details,
                instance="process-b",
            )
        assert info.value.code == p.E_DUPLICATE_ID
        assert info.value.message == (
            "node id n1 is in use by another machine at 127.0.0.1 (hostname pi-a): a copied SD"
            " card? Delete node_id in the slave's state_dir on one of the two Pis and restart"
            " its rpicluster-slave"
        )
        copies.append(copy)
    assert lines(caplog, "a copied SD card?") == [
        "node id n1 is claimed by 127.0.0.1 (hostname pi-b) while 127.0.0.1 (hostname pi-a)"
        " holds it: a copied SD card? refused with duplicate_id (1 refusals so far)"
    ]
    for sock in [first, *copies]:
        sock.close()


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({}, p.E_BAD_MESSAGE, "query forget needs a field 'node': a name of 1..{MAX}"),
        (
            {"node": "n1", "force": 1},
            p.E_BAD_MESSAGE,
            "query forget field 'force' must be true or false",
        ),
        ({"node": "nobody"}, p.E_NOT_FOUND, "no node 'nobody'"),
        (
            {"node": "n1"},
            p.E_CONNECTED,
            "node n1 (n1) is connected: stop its slave first, or force",
        ),
    ],
)
def test_forget_refusals_are_named(master, cluster_secret, fields, code, message):
    from rpicluster import memberdata as md

    slave = join(master, cluster_secret)
    client = join(master, cluster_secret, kind="client")
    reply = query(client, 1, "forget", **fields)
    assert reply["error"] == {"code": code, "message": message.replace("{MAX}", str(md.MAX_STRING))}
    slave.close()
    client.close()


def test_only_a_client_may_forget(master, cluster_secret):
    slave = join(master, cluster_secret)
    reply = query(slave, 1, "forget", node="n1")
    assert reply["error"] == {
        "code": p.E_BAD_MESSAGE,
        "message": "only a client connection may ask forget",
    }
    slave.close()


def test_an_ambiguous_name_lists_eight_ids_at_most(master, cluster_secret):
    slaves = [
        join(master, cluster_secret, f"id-{i}", details={"hostname": "same"}) for i in range(9)
    ]
    client = join(master, cluster_secret, kind="client")
    reply = query(client, 1, "forget", node="same", force=True)
    ids = ", ".join(f"id-{i}" for i in range(8))
    assert reply["error"] == {
        "code": p.E_AMBIGUOUS,
        "message": f"9 nodes are named 'same' ({ids}): give the node id",
    }
    for sock in slaves + [client]:
        sock.close()


def test_a_forced_forget_says_who_asked(master, cluster_secret, caplog):
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    slave = join(master, cluster_secret)
    client = join(master, cluster_secret, node_id="operator", kind="client")
    reply = query(client, 1, "forget", node="n1", force=True)
    assert reply["data"]["connections_closed"] == 1
    assert lines(caplog, "forgotten (") == [
        "node n1 forgotten (forgotten by node_id=operator role=basic kind=client);"
        " 1 connection(s) closed"
    ]
    slave.close()
    client.close()


def test_history_replies_fill_half_a_frame(master_factory, cluster_secret):
    import json

    master = master_factory(cluster={**QUIET, "max_frame_size": 16384})
    slave = join(master, cluster_secret, role="vitals")
    now = round(time.time())
    vitals = [{"ts": now + i, **{f"k{k}": 1.25 for k in range(8)}} for i in range(120)]
    clock = master.clock = master.registry.clock = FakeClock(time.monotonic())
    for start in range(0, 120, 30):  # 30 reports, then 2 s for the bucket to refill
        for point in vitals[start : start + 30]:
            p.send_frame(slave, p.make(p.VITALS, vitals=point))
        roundtrip(slave, start)
        clock.now += 2.0
    size = len(json.dumps(vitals[0]))
    fits = (16384 // 2 - 2) // (size + 1)
    client = join(master, cluster_secret, kind="client")
    reply = query(client, 1, "history", node_id="n1")
    assert len(reply["data"]["points"]) == fits and reply["data"]["more"] is True
    slave.close()
    client.close()


def test_fit_node_keeps_a_node_of_exactly_the_budget_whole():
    import json

    from rpicluster.master.queries import fit_node

    node = {
        "node_id": "n",
        "roles": ["basic"],
        "details": {"k": "v" * 50},
        "vitals": {"t": 1},
        "action_errors": {"basic": {"count": 1, "last": "x" * 50}},
    }
    whole = json.dumps(node)
    assert fit_node(node, len(whole)) == whole
    stub = json.loads(fit_node(node, len(whole) - 1))
    assert stub == {
        "node_id": "n",
        "roles": ["basic"],
        "details": {},
        "vitals": None,
        "action_errors": {},
        "truncated": True,
    }
    assert fit_node(node, len(json.dumps(stub))) == json.dumps(stub)
    bare = json.loads(fit_node(node, len(json.dumps(stub)) - 1))
    assert bare["roles"] == [] and bare["truncated"] is True


def test_a_silent_stranger_is_told_the_handshake_limit_exactly(master, caplog):
    caplog.set_level(logging.WARNING)
    sock, _ = stranger(master)
    error = p.recv_message(sock)
    assert (error["code"], error["message"]) == (
        p.E_HANDSHAKE_TIMEOUT,
        f"no valid hello within {master.config.cluster.handshake_timeout:g} s",
    )
    wait_for(lambda: counters(master)["connections_open"] == 0, what="the stranger closed")
    sock.close()
    assert counters(master)["handshake_timeouts_total"] == 1
    assert not [r for r in caplog.records if r.name == "asyncio"]  # connection_lost was clean
