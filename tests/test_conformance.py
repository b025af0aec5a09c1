"""Conformance: a live master driven only with bytes built from docs/protocol.md.

Nothing here imports ``rpicluster.protocol``: framing, the netstring MAC input
and HMAC are written again from the doc, as an implementer in another language
would. Each error of the doc's section 7 table is provoked, and the counters the
table names are read back from the master; the happy path checks the doc's
worked example and every message of section 5 the master sends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.helpers import wait_for

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
PREAUTH = 16384


# ------------------------------------------------------------ from the doc only


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def msg(**fields: Any) -> bytes:
    return frame(json.dumps(fields, separators=(",", ":")).encode())


def recv(sock: socket.socket) -> dict:
    head = _exactly(sock, 4)
    (length,) = struct.unpack(">I", head)
    return json.loads(_exactly(sock, length))


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data


def ns(part: Any) -> bytes:
    data = str(part).encode()
    return str(len(data)).encode() + b":" + data + b","


def mac(secret: str, *parts: str) -> str:
    text = b"".join(ns(x) for x in ("rpicluster/2",) + parts)
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def hello(secret: str, challenge: dict, **over: Any) -> bytes:
    nonce = os.urandom(16).hex()
    fields = {"type": "hello", "protocol": 2, "kind": "slave", "node_id": "c1", "role": "basic"}
    fields.update(nonce=nonce)
    fields.update({k: v for k, v in over.items() if k != "mac"})
    fields["mac"] = over.get(
        "mac",
        mac(
            secret,
            "hello",
            challenge["nonce"],
            fields["nonce"],
            fields["kind"],
            fields["node_id"],
            fields["role"],
        ),
    )
    return msg(**{k: v for k, v in fields.items() if v is not None})


def join(port: int, secret: str, **over: Any) -> socket.socket:
    sock = connect(port)
    challenge = recv(sock)
    sock.sendall(hello(secret, challenge, **over))
    welcome = recv(sock)
    assert welcome["type"] == "welcome", welcome
    return sock


def closed_with(sock: socket.socket, code: str) -> dict:
    error = recv(sock)
    assert error["type"] == "error" and error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    with pytest.raises((EOFError, ConnectionError)):
        recv(sock)
    sock.close()
    return error


def doc_counters() -> dict[str, list[str]]:
    """Error code -> the counters the doc's section 7 tables say it bumps."""
    table: dict[str, list[str]] = {}
    section = DOC[DOC.index("## 7. Errors") : DOC.index("## 8. Queries")]
    for line in section.splitlines():
        row = re.match(r"\| `([a-z_]+)` \| (.*) \| (.*) \|$", line)
        if row:
            table.setdefault(row.group(1), re.findall(r"`([a-z_]+_total)`", row.group(3)))
    return table


COUNTED = doc_counters()


class Probe:
    """Reads the master's counters with a status client (kind client)."""

    def __init__(self, port: int, secret: str):
        self.sock = join(port, secret, kind="client", node_id="probe", role="-")
        self.ids = 0

    def query(self, **fields: Any) -> dict:
        self.ids += 1
        self.sock.sendall(msg(type="query", id=self.ids, **fields))
        while True:
            reply = recv(self.sock)
            if reply["type"] == "reply" and reply["id"] == self.ids:
                return reply

    def counters(self) -> dict:
        return self.query(what="cluster")["data"]["master"]["counters"]


@pytest.fixture
def master(master_factory):
    return master_factory(
        cluster={"handshake_timeout": 0.5, "suspect_after": 30, "dead_after": 60},
        master={"max_unauthenticated_per_address": 8},
    )


@pytest.fixture
def probe(master, cluster_secret):
    probe = Probe(master.port, cluster_secret)
    yield probe
    probe.sock.close()


def bumped(probe: Probe, code: str, before: dict) -> None:
    """Every counter the doc's table names for ``code`` went up."""

    def done() -> bool:
        after = probe.counters()
        return all(after[name] > before[name] for name in COUNTED[code])

    wait_for(done, 5, what=f"counters {COUNTED[code]} of {code}")


# ------------------------------------------------------------------ happy path


def test_worked_example_of_the_doc():
    secret = "correct-horse-battery-staple"
    sn, cn = "00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100"
    hello_input = "".join(
        ns(x).decode() for x in ("rpicluster/2", "hello", sn, cn, "slave", "node-7f3a", "basic")
    )
    assert hello_input in DOC
    assert f"= {mac(secret, 'hello', sn, cn, 'slave', 'node-7f3a', 'basic')}" in DOC
    welcome_input = "".join(ns(x).decode() for x in ("rpicluster/2", "welcome", cn, sn))
    assert welcome_input in DOC
    assert f"= {mac(secret, 'welcome', cn, sn)}" in DOC
    hello_line = next(line for line in DOC.splitlines() if line.startswith('{"type":"hello"'))
    assert f"00 00 00 {len(hello_line):02x}" in DOC
    assert json.loads(hello_line)["mac"] == mac(
        secret, "hello", sn, cn, "slave", "node-7f3a", "basic"
    )


def test_happy_path(master, cluster_secret, probe):
    sock = connect(master.port)
    challenge = recv(sock)
    assert challenge["type"] == "challenge" and challenge["protocol"] == 2
    assert re.fullmatch(r"[0-9a-f]{32}", challenge["nonce"])
    assert challenge["max_frame_size"] == master.config.cluster.max_frame_size
    nonce = os.urandom(16).hex()
    node_mac = mac(cluster_secret, "hello", challenge["nonce"], nonce, "slave", "conf-1", "basic")
    sock.sendall(
        msg(
            type="hello",
            protocol=2,
            kind="slave",
            node_id="conf-1",
            role="basic",
            nonce=nonce,
            mac=node_mac,
            details={"hostname": "conf-pi", "groups": ["a"]},
        )
    )
    welcome = recv(sock)
    assert welcome["type"] == "welcome" and welcome["protocol"] == 2
    assert hmac.compare_digest(
        welcome["mac"], mac(cluster_secret, "welcome", nonce, challenge["nonce"])
    )
    for key in ("heartbeat_interval", "suspect_after", "dead_after", "max_frame_size"):
        assert key in welcome["master"]
    # The doc's heartbeat, byte by byte, and its acknowledgement.
    sock.sendall(bytes.fromhex("00000033") + b'{"type":"heartbeat","seq":1,"sent_at":1795822963.5}')
    assert _exactly(sock, 36) == bytes.fromhex("00000020") + b'{"type":"heartbeat_ack","seq":1}'
    # A point of now: the master keeps only history_window seconds of history.
    sock.sendall(msg(type="vitals", vitals={"ts": time.time(), "load_1": 0.5, "temperature": None}))
    sock.sendall(msg(type="action_error", error="boom", count=1))
    sock.sendall(msg(type="query", id=7, what="node", node_id="conf-1"))
    reply = recv(sock)
    assert reply == {"type": "reply", "id": 7, "ok": True, "data": reply["data"]}
    node = reply["data"]
    assert node["hostname"] == "conf-pi" and node["state"] == "alive" and node["connected"]
    assert node["vitals"]["load_1"] == 0.5
    assert node["action_errors"] == {"basic": {"count": 1, "last": "boom"}}
    sock.sendall(msg(type="query", id=8, what="history", node_id="conf-1", limit=10))
    history = recv(sock)["data"]
    assert history["node_id"] == "conf-1" and history["more"] is False
    assert history["points"][-1]["load_1"] == 0.5
    page = probe.query(what="cluster", offset=0, limit=1)["data"]
    assert page["total"] == 1 and page["next_offset"] is None
    sock.sendall(msg(type="goodbye", reason="done"))
    with pytest.raises((EOFError, ConnectionError)):
        recv(sock)
    wait_for(lambda: probe.query(what="node", node_id="conf-1")["data"]["state"] == "left", 5)


# --------------------------------------------------------- the error table


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (struct.pack(">I", 0), "bad_frame"),
        (frame(b"\xff\xfe"), "bad_frame"),
        (frame(b"{oops"), "bad_frame"),
        (frame(b'{"type":"hello","x":NaN}'), "bad_frame"),
        (frame(b'{"type":"hello","x":1e400}'), "bad_frame"),
        (frame(b'{"type":"hello","x":9007199254740993}'), "bad_frame"),
        (frame(b'{"a":' * 17 + b"1" + b"}" * 17), "bad_frame"),
        (struct.pack(">I", PREAUTH + 1), "frame_too_large"),
        (frame(b"[1]"), "bad_message"),
        (frame(b'{"seq":1}'), "bad_message"),
        (msg(type="teleport"), "bad_message"),  # anything but hello first
        (msg(type="heartbeat", seq=1, sent_at=1), "bad_message"),
    ],
)
def test_first_frame_errors(master, probe, payload, code):
    before = probe.counters()
    sock = connect(master.port)
    recv(sock)
    sock.sendall(payload)
    closed_with(sock, code)
    bumped(probe, code, before)


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"protocol": 1}, "bad_protocol_version"),
        ({"protocol": 2.0}, "bad_protocol_version"),
        ({"protocol": True}, "bad_protocol_version"),
        ({"protocol": "2"}, "bad_protocol_version"),
        ({"mac": None}, "auth_failed"),
        ({"mac": ""}, "auth_failed"),
        ({"mac": 12345}, "auth_failed"),
        ({"mac": "0" * 64}, "auth_failed"),
        ({"kind": "robot"}, "bad_message"),
        ({"node_id": 7}, "bad_message"),
        ({"node_id": "bad\nid"}, "bad_message"),
        ({"node_id": " padded"}, "bad_message"),
        ({"node_id": "x" * 129}, "bad_message"),
        ({"role": "r\u202e"}, "bad_message"),
        ({"nonce": "short"}, "bad_message"),
        ({"details": [1]}, "bad_message"),
        ({"instance": ""}, "bad_message"),
        ({"instance": 7}, "bad_message"),
        ({"instance": "x" * 129}, "bad_message"),
        ({"details": {"hostname": "a\x1bb"}}, "bad_details"),
        ({"details": {"k": "x" * 257}}, "bad_details"),
        ({"details": {f"k{i}": "x" * 250 for i in range(40)}}, "bad_details"),
    ],
)
def test_hello_errors(master, cluster_secret, probe, over, code):
    before = probe.counters()
    sock = connect(master.port)
    sock.sendall(hello(cluster_secret, recv(sock), **over))
    closed_with(sock, code)
    bumped(probe, code, before)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (msg(type="teleport"), "unknown_type"),
        (msg(type="welcome", protocol=2, mac="x", master={}), "bad_message"),
        (msg(type="hello", protocol=2), "bad_message"),
        (msg(type="heartbeat", seq="1", sent_at=1), "bad_message"),
        (msg(type="vitals", vitals=[1]), "bad_message"),
        (frame(b'{"type":"vitals","vitals":{"x":' + b"9" * 400 + b"}}"), "bad_frame"),
        (struct.pack(">I", 2 * 1024 * 1024), "frame_too_large"),
    ],
)
def test_member_errors(master, cluster_secret, probe, payload, code):
    before = probe.counters()
    sock = join(master.port, cluster_secret)
    sock.sendall(payload)
    closed_with(sock, code)
    bumped(probe, code, before)


def test_client_may_not_send_vitals(master, cluster_secret, probe):
    sock = join(master.port, cluster_secret, kind="client", node_id="cli", role="-")
    sock.sendall(msg(type="vitals", vitals={"a": 1}))
    closed_with(sock, "bad_message")


def test_too_many_connections(master, probe):
    before = probe.counters()
    held = [connect(master.port, "127.0.0.5") for _ in range(8)]
    for sock in held:
        assert recv(sock)["type"] == "challenge"
    closed_with(connect(master.port, "127.0.0.5"), "too_many_connections")
    bumped(probe, "too_many_connections", before)
    for sock in held:
        sock.close()


def test_too_many_roles(master, cluster_secret, probe):
    before = probe.counters()
    held = [join(master.port, cluster_secret, node_id="roles", role=f"r{i}") for i in range(32)]
    sock = connect(master.port)
    sock.sendall(hello(cluster_secret, recv(sock), node_id="roles", role="r32"))
    closed_with(sock, "too_many_roles")
    bumped(probe, "too_many_roles", before)
    for sock in held:
        sock.close()


def test_handshake_timeout(master, probe):
    before = probe.counters()
    sock = connect(master.port)
    recv(sock)
    sock.sendall(struct.pack(">I", 100) + b"{")  # half a frame, then stall
    closed_with(sock, "handshake_timeout")
    bumped(probe, "handshake_timeout", before)


def test_replaced(master, cluster_secret, probe):
    before = probe.counters()
    old = join(master.port, cluster_secret, node_id="twin")
    new = join(master.port, cluster_secret, node_id="twin")
    closed_with(old, "replaced")
    bumped(probe, "replaced", before)
    new.close()


def test_silent(master_factory, cluster_secret):
    master = master_factory(
        cluster={"heartbeat_interval": 0.1, "suspect_after": 0.3, "dead_after": 0.6}
    )
    sock = join(master.port, cluster_secret, node_id="quiet")
    sock.settimeout(10)
    closed_with(sock, "silent")
    assert master.counters.silent_deaths_total == 1


def test_refused_notices_and_rate_exceeded(master, cluster_secret, probe):
    before = probe.counters()
    sock = join(master.port, cluster_secret, node_id="noisy", role="vitals")
    sock.sendall(msg(type="vitals", vitals={"Bad-Key": 1}))
    notice = recv(sock)
    assert notice == {**notice, "type": "refused", "code": "bad_vitals", "count": 1}
    bumped(probe, "bad_vitals", before)
    time.sleep(1.05)  # one notice per second at most
    sock.sendall(msg(type="action_error", error="x", count=-1))
    assert recv(sock)["code"] == "bad_action_error"
    time.sleep(1.05)
    sock.sendall(msg(type="vitals", vitals={"a": 1}) * 60)  # burst of 40, then refused
    notice = recv(sock)
    assert notice["code"] == "vitals_rate_limited"
    bumped(probe, "vitals_rate_limited", before)
    sock.sendall(msg(type="heartbeat", seq=1, sent_at=1))
    while (answer := recv(sock))["type"] != "heartbeat_ack":
        assert answer["type"] == "refused"
    sock.sendall(msg(type="vitals", vitals={"a": 1}) * 1000)
    error: Optional[dict] = None
    while error is None:
        answer = recv(sock)
        error = answer if answer["type"] == "error" else None
    assert error["code"] == "rate_exceeded"
    bumped(probe, "rate_exceeded", before)


def test_query_failures_are_replies(master, cluster_secret, probe):
    before = probe.counters()
    for fields, code in [
        ({"what": "weather"}, "bad_message"),
        ({"what": "node"}, "bad_message"),
        ({"what": "node", "node_id": "nobody"}, "not_found"),
        ({"what": "history", "node_id": "nobody"}, "not_found"),
        ({"what": "cluster", "offset": -1}, "bad_message"),
    ]:
        reply = probe.query(**fields)
        assert reply["ok"] is False and reply["error"]["code"] == code, (fields, reply)
    join(master.port, cluster_secret, node_id="h").close()
    reply = probe.query(what="history", node_id="h", limit=1001)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_message"
    after = probe.counters()
    assert after["failed_queries_total"] - before["failed_queries_total"] == 6
    assert after["bad_messages_total"] == before["bad_messages_total"]


def test_duplicate_id_and_names(master, cluster_secret, probe):
    """Section 7.1: the first machine keeps a node id; names are node objects' fields."""
    before = probe.counters()
    holder = join(
        master.port,
        cluster_secret,
        node_id="card",
        instance="machine-a",
        details={"hostname": "raspberrypi", "node_name": "pi-1", "groups": ["slaves"]},
    )
    holder.sendall(msg(type="heartbeat", seq=1, sent_at=time.time()))
    assert recv(holder) == {"type": "heartbeat_ack", "seq": 1}
    copy = connect(master.port)
    copy.sendall(hello(cluster_secret, recv(copy), node_id="card", instance="machine-b"))
    error = closed_with(copy, "duplicate_id")
    assert "raspberrypi" in error["message"]
    bumped(probe, "duplicate_id", before)
    # The same process (same instance) reconnecting replaces its older connection.
    again = join(master.port, cluster_secret, node_id="card", instance="machine-a")
    closed_with(holder, "replaced")
    node = probe.query(what="node", node_id="card")["data"]
    assert node["name"] == "pi-1" and node["groups"] == ["slaves"]
    assert node["hostname"] == "raspberrypi"
    assert node["duplicate_id"] is True and node["duplicate_id_address"] == "127.0.0.1"
    twin = join(master.port, cluster_secret, node_id="card-2", details={"node_name": "pi-1"})
    page = probe.query(what="cluster")["data"]
    flags = {n["node_id"]: n["duplicate_name"] for n in page["nodes"]}
    assert flags == {"card": True, "card-2": True}
    twin.close()
    again.close()


def test_forget_query(master, cluster_secret, probe):
    """Section 8.5: each answer of the forget query, and `forgotten` for a forced one."""
    before = probe.counters()
    held = join(master.port, cluster_secret, node_id="f-1", details={"hostname": "pi-f"})
    for fields, code in [
        ({"node": "nobody"}, "not_found"),
        ({"node": "pi-f"}, "connected"),
        ({"node": "pi-f", "force": 1}, "bad_message"),
        ({"node": ""}, "bad_message"),
        ({}, "bad_message"),
    ]:
        reply = probe.query(what="forget", **fields)
        assert reply["ok"] is False and reply["error"]["code"] == code, (fields, reply)
    for node_id in ("f-2", "f-3"):  # two dead nodes sharing a name
        join(master.port, cluster_secret, node_id=node_id, details={"hostname": "twin"}).close()
    wait_for(lambda: probe.query(what="node", node_id="f-3")["data"]["state"] == "dead", 5)
    reply = probe.query(what="forget", node="twin")
    assert reply["ok"] is False and reply["error"]["code"] == "ambiguous"
    assert "f-2" in reply["error"]["message"] and "f-3" in reply["error"]["message"]
    reply = probe.query(what="forget", node="f-2")
    assert reply["ok"] is True
    assert reply["data"] == {"node_id": "f-2", "name": "twin", "state": "dead",
                             "connections_closed": 0}  # fmt: skip
    reply = probe.query(what="forget", node="pi-f", force=True)
    assert reply["ok"] is True and reply["data"]["connections_closed"] == 1
    closed_with(held, "forgotten")
    bumped(probe, "forgotten", before)
    page = probe.query(what="cluster")["data"]
    assert [n["node_id"] for n in page["nodes"]] == ["f-3"]
    assert page["master"]["forget_after"] == 604800
    slave = join(master.port, cluster_secret, node_id="f-4")
    slave.sendall(msg(type="query", id=1, what="forget", node="f-3"))
    reply = recv(slave)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_message"
    slave.close()


def test_identity_mismatch_over_tls(master_factory, make_config, cluster_secret, tmp_path):
    """Section 13: a Pi's certificate speaks only for its own node name (stdlib ssl only)."""
    from tests.tlscerts import CA, tls_section

    ca = CA(tmp_path / "pki")
    master_cert, pi = ca.master("master"), ca.issue("pi-a")
    tls_master = master_factory(
        config=make_config(
            master={"socket_bind_ip": "127.0.0.1", "socket_port": 0}, tls=tls_section(master_cert)
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the master's name and CA
    context.load_verify_locations(pi.ca_file)
    context.load_cert_chain(pi.cert_file, pi.key_file)
    sock = context.wrap_socket(connect(tls_master.port), server_hostname="127.0.0.1")
    challenge = recv(sock)
    assert challenge["type"] == "challenge"
    sock.sendall(hello(cluster_secret, challenge, details={"node_name": "pi-b"}))
    error = closed_with(sock, "identity_mismatch")
    assert "pi-b" in error["message"] and "pi-a" in error["message"]
    counters = tls_master.cluster_state()["master"]["counters"]
    assert all(counters[name] == 1 for name in COUNTED["identity_mismatch"])


def test_every_error_code_of_the_doc_is_covered():
    codes = set(COUNTED)
    covered = {
        "too_many_connections", "bad_frame", "frame_too_large", "bad_message", "unknown_type",
        "bad_protocol_version", "auth_failed", "bad_details", "too_many_roles",
        "handshake_timeout", "replaced", "silent", "rate_exceeded", "vitals_rate_limited",
        "bad_vitals", "bad_action_error", "forgotten", "duplicate_id", "identity_mismatch",
    }  # fmt: skip
    assert codes == covered
