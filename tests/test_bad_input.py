"""Bad input never hurts anyone else.

Each test throws one kind of bad input at a live master and checks three things:
the bad peer gets a clear ``error`` frame and/or its connection closed, the master
logs it once with the peer's address, and a good slave connected all along keeps
working with the registry intact.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpicluster import protocol as p
from tests.helpers import wait_for

# A short handshake timeout; long liveness limits so the good slave, which only
# talks when a test asks it to, never goes suspect in the middle of a test.
SHORT_HANDSHAKE = {
    "handshake_timeout": 0.3,
    "heartbeat_interval": 1,
    "suspect_after": 30,
    "dead_after": 60,
}


@pytest.fixture
def master(master_factory):
    return master_factory(cluster=SHORT_HANDSHAKE)


class Good:
    """A well-behaved slave that stays connected through every test."""

    def __init__(self, master, secret):
        self.master = master
        self.sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
        p.client_handshake(
            self.sock, secret, kind="slave", node_id="good", role="basic", details={"hostname": "g"}
        )
        self.seq = 0

    def still_works(self):
        """Heartbeat acked, the registry holds only what it should."""
        self.seq += 1
        p.send_frame(self.sock, p.make(p.HEARTBEAT, seq=self.seq, sent_at=time.time()))
        assert p.recv_message(self.sock) == {"type": p.HEARTBEAT_ACK, "seq": self.seq}
        p.send_frame(self.sock, p.make(p.QUERY, id=self.seq, what="node", node_id="good"))
        reply = p.recv_message(self.sock)
        assert reply["ok"] is True
        assert reply["data"]["state"] == "alive" and reply["data"]["hostname"] == "g"
        return True


@pytest.fixture
def good(master, cluster_secret):
    peer = Good(master, cluster_secret)
    yield peer
    peer.sock.close()


def raw(master):
    """A connection that has read the challenge, as a slave in another language would."""
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    challenge = p.recv_message(sock)
    assert challenge["type"] == p.CHALLENGE and challenge["protocol"] == p.PROTOCOL_VERSION
    return sock, challenge


def authed(master, secret, node_id="bad"):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    p.client_handshake(sock, secret, kind="slave", node_id=node_id, role="basic")
    return sock


def hello(challenge, secret, **override):
    nonce = p.new_nonce()
    fields = {
        "protocol": p.PROTOCOL_VERSION,
        "kind": "slave",
        "node_id": "bad",
        "role": "basic",
        "nonce": nonce,
        "mac": p.hello_mac(secret, challenge["nonce"], nonce, "slave", "bad", "basic"),
    }
    fields.update(override)
    return p.make(p.HELLO, **{k: v for k, v in fields.items() if v is not None})


def body_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def refused(sock, code):
    """The master's answer is an ``error`` frame with ``code``, then the connection closes."""
    error = p.recv_message(sock)
    assert error["type"] == p.ERROR, error
    assert error["code"] == code, error
    assert error["message"]
    with pytest.raises(p.DisconnectionError):
        p.recv_message(sock)
    sock.close()
    return error


def logged_once(caplog, words):
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "rpicluster.master" and r.levelno >= logging.WARNING
    ]
    matching = [line for line in lines if words in line]
    assert len(matching) == 1, lines
    assert "127.0.0.1:" in matching[0]  # the peer's address
    return matching[0]


def counters(master):
    return master.cluster_state()["master"]["counters"]


# ---------------------------------------------------------------- before hello


def test_malformed_json(master, good, caplog):
    sock, _ = raw(master)
    sock.sendall(body_frame(b'{"type": "hello", "protocol": 1,'))
    refused(sock, p.E_BAD_FRAME)
    logged_once(caplog, "bad_frame")
    assert counters(master)["rejected_frames_total"] == 1
    assert good.still_works()


def test_frame_over_the_limit_is_refused_from_its_header(master, good, caplog):
    sock, _ = raw(master)
    # Before authenticating, the limit is the small pre-auth one (a hello is tiny).
    sock.sendall(struct.pack(">I", p.PREAUTH_MAX_FRAME_SIZE + 1))  # no body sent
    error = refused(sock, p.E_FRAME_TOO_LARGE)
    assert str(p.PREAUTH_MAX_FRAME_SIZE) in error["message"]
    logged_once(caplog, "frame_too_large")
    assert good.still_works()


def test_random_bytes(master, good, caplog):
    sock, _ = raw(master)
    sock.sendall(b"\xde\xad\xbe\xef" + os.urandom(60))
    refused(sock, p.E_FRAME_TOO_LARGE)
    logged_once(caplog, "frame_too_large")
    assert good.still_works()


def test_silent_client_times_out(master, good, caplog):
    sock, _ = raw(master)
    error = refused(sock, p.E_HANDSHAKE_TIMEOUT)
    assert "0.3 s" in error["message"]
    logged_once(caplog, "handshake_timeout")
    assert counters(master)["handshake_timeouts_total"] == 1
    assert good.still_works()


def test_half_a_frame_then_stall_times_out(master, good, cluster_secret, caplog):
    sock, challenge = raw(master)
    frame = hello(challenge, cluster_secret)
    sock.sendall(frame[: len(frame) // 2])
    error = refused(sock, p.E_HANDSHAKE_TIMEOUT)
    assert "pending" in error["message"]
    logged_once(caplog, "handshake_timeout")
    assert good.still_works()


def test_wrong_protocol_version(master, good, cluster_secret, caplog):
    sock, challenge = raw(master)
    sock.sendall(hello(challenge, cluster_secret, protocol=1))
    error = refused(sock, p.E_BAD_VERSION)
    assert "protocol 1" in error["message"]
    logged_once(caplog, "bad_protocol_version")
    assert good.still_works()


def test_wrong_secret(master, good, caplog):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    with pytest.raises(p.ProtocolError) as info:
        p.client_handshake(sock, "not-the-secret-at-all", kind="slave", node_id="bad", role="b")
    assert info.value.code == p.E_AUTH_FAILED
    assert info.value.message == "hello mac does not match: wrong cluster secret"
    sock.close()
    line = logged_once(caplog, "auth_failed")
    assert "wrong cluster secret" in line and "node_id=bad" in line
    assert counters(master)["auth_failures_total"] == 1
    assert good.still_works()
    assert [n["node_id"] for n in master.cluster_state()["nodes"]] == ["good"]


def test_no_secret(master, good, cluster_secret, caplog):
    sock, challenge = raw(master)
    sock.sendall(hello(challenge, cluster_secret, mac=None))
    error = refused(sock, p.E_AUTH_FAILED)
    assert "no mac" in error["message"]
    logged_once(caplog, "auth_failed")
    assert good.still_works()
    assert [n["node_id"] for n in master.cluster_state()["nodes"]] == ["good"]


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"kind": "overlord"}, "kind"),
        ({"node_id": ""}, "node_id"),
        ({"node_id": "a\nb"}, "node_id"),
        ({"role": "r" * 500}, "role"),
        ({"nonce": "short"}, "nonce"),
        ({"details": [1, 2]}, "details"),
        ({"kind": 5}, "'kind'"),
    ],
)
def test_hello_with_bad_fields(master, good, cluster_secret, caplog, override, words):
    sock, challenge = raw(master)
    sock.sendall(hello(challenge, cluster_secret, **override))
    error = refused(sock, p.E_BAD_MESSAGE)
    assert words in error["message"]
    logged_once(caplog, "bad_message")
    assert good.still_works()


def test_first_message_not_a_hello(master, good, caplog):
    sock, _ = raw(master)
    sock.sendall(p.make(p.HEARTBEAT, seq=1, sent_at=0))
    error = refused(sock, p.E_BAD_MESSAGE)
    assert "expected a hello" in error["message"]
    logged_once(caplog, "bad_message")
    assert good.still_works()


# ----------------------------------------------------------------- after hello


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (body_frame(b"{oops"), p.E_BAD_FRAME, "not UTF-8 JSON"),
        (body_frame(b'{"type": "teleport"}'), p.E_UNKNOWN_TYPE, "teleport"),
        (body_frame(b'{"type": "heartbeat", "sent_at": 1}'), p.E_BAD_MESSAGE, "'seq'"),
        (body_frame(b'{"type": "vitals", "vitals": [1]}'), p.E_BAD_MESSAGE, "'vitals'"),
        (body_frame(b'{"type": "vitals", "vitals": {"t": NaN}}'), p.E_BAD_FRAME, "NaN"),
        (p.make(p.WELCOME, protocol=1, mac="x", master={}), p.E_BAD_MESSAGE, "welcome"),
        (
            p.make(p.HELLO, protocol=1, kind="slave", node_id="x", role="r", nonce="n", mac="m"),
            p.E_BAD_MESSAGE,
            "hello",
        ),
    ],
)
def test_bad_message_from_a_member(master, good, cluster_secret, caplog, frame, code, words):
    sock = authed(master, cluster_secret)
    sock.sendall(frame)
    error = refused(sock, code)
    assert words in error["message"]
    logged_once(caplog, code)
    assert good.still_works()
    # The bad member's connection closed without goodbye: it is dead, the good one alive.
    state = {n["node_id"]: n["state"] for n in master.cluster_state()["nodes"]}
    assert state == {"good": "alive", "bad": "dead"}


def test_client_may_not_send_vitals(master, good, cluster_secret, caplog):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    p.client_handshake(sock, cluster_secret, kind="client", node_id="cli", role="-")
    sock.sendall(p.make(p.VITALS, vitals={"cpu_percent": 1}))
    refused(sock, p.E_BAD_MESSAGE)
    logged_once(caplog, "only a slave")
    assert good.still_works()


def test_bad_query_fields_get_an_error_reply_not_a_closure(master, good, cluster_secret):
    sock = authed(master, cluster_secret)
    for qid, fields in enumerate(
        [
            {"what": "cluster", "offset": -1},
            {"what": "cluster", "limit": "ten"},
            {"what": "node"},
            {"what": "history", "node_id": "good", "since": "yesterday"},
        ]
    ):
        sock.sendall(p.make(p.QUERY, id=qid, **fields))
        reply = p.recv_message(sock)
        assert reply["ok"] is False and reply["error"]["code"] == p.E_BAD_MESSAGE
    sock.sendall(p.make(p.HEARTBEAT, seq=1, sent_at=0))
    assert p.recv_message(sock)["type"] == p.HEARTBEAT_ACK
    sock.close()
    assert good.still_works()


# -------------------------------------------------------------- property test

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_messages = st.builds(
    lambda msg_type, fields: {**fields, "type": msg_type},
    st.sampled_from(sorted(p.SCHEMAS) + ["", "x"]),
    st.dictionaries(
        st.sampled_from(
            [
                "seq",
                "sent_at",
                "vitals",
                "id",
                "what",
                "node_id",
                "reason",
                "error",
                "count",
                "protocol",
                "kind",
                "role",
                "nonce",
                "mac",
                "details",
            ]
        ),
        _json,
        max_size=6,
    ),
)
_frames = st.one_of(
    _messages.map(lambda m: body_frame(json.dumps(m).encode())),
    st.binary(min_size=1, max_size=64).map(body_frame),
    st.binary(min_size=1, max_size=64),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(_frames, min_size=1, max_size=5), log_in=st.booleans())
def test_random_frames_never_hurt_a_good_slave(master, good, cluster_secret, frames, log_in):
    if log_in:
        sock = authed(master, cluster_secret, node_id="fuzz")
    else:
        sock, _ = raw(master)
    try:
        for frame in frames:
            sock.sendall(frame)
    except OSError:
        pass  # the master already closed us: that is an allowed answer
    sock.close()
    assert good.still_works()
    ids = {n["node_id"] for n in master.cluster_state()["nodes"]}
    assert ids <= {"good", "fuzz"}


def test_peer_that_never_reads_its_replies_is_dropped(master, good, cluster_secret, caplog):
    master.close_timeout = 0.2  # abort the unflushable connection quickly
    big = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    p.client_handshake(
        big,
        cluster_secret,
        kind="slave",
        node_id="big",
        role="basic",
        details={f"b{i}": "x" * 250 for i in range(30)},  # near the 8 KiB details limit
    )
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", master.port))
    p.client_handshake(reader, cluster_secret, kind="client", node_id="lazy", role="-")
    open_before = counters(master)["connections_open"]
    # 2,000 replies of 8 KB: far more than the master queues for one peer (8 MiB).
    reader.sendall(b"".join(p.make(p.QUERY, id=i, what="cluster") for i in range(2000)))
    wait_for(
        lambda: counters(master)["connections_open"] == open_before - 1, 10, what="lazy dropped"
    )
    logged_once(caplog, "does not read its replies")
    assert good.still_works()
    reader.close()
    big.close()
