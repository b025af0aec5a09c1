"""A peer's TLS identity on the master (peertls.py), with real certificates made in tmp_path
and a real master on 127.0.0.1: a certificate naming nobody is refused and counted each
time, a failed handshake names the peer, a long claimed name is cut in the refusal, the same
Pi reconnecting keeps its node, a reinstalled Pi's old entry is forgotten with the reason,
and a node known from before TLS is bound to the first certificate that speaks as it."""

from __future__ import annotations

import contextlib
import datetime
import logging
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from tests.conftest import TEST_SECRET
from tests.helpers import on_loop, wait_for
from tests.tlscerts import CA, tls_section

QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}


@pytest.fixture
def pki(tmp_path: Path) -> dict:
    ca = CA(tmp_path / "pki")
    rogue = CA(tmp_path / "rogue", name="rogue CA")
    return {
        "ca": ca,
        "master": ca.master("master"),
        "pi-a": ca.issue("pi-a"),
        "nameless": nameless(ca, tmp_path / "pki"),
        "rogue-pi": rogue.issue("pi-a", ca_file=ca.path),
    }


def nameless(ca: CA, directory: Path) -> tlsmod.TlsSettings:
    """A credential of the cluster CA whose certificate names no one (no CN, no DNS name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / "nameless.crt", directory / "nameless.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return tlsmod.TlsSettings(str(ca.path), str(cert_path), str(key_path))


def tls_master(master_factory, make_config, pki, state_dir):
    config = make_config(
        cluster=QUIET,
        master={"socket_bind_ip": "127.0.0.1", "state_dir": str(state_dir), "socket_port": 0},
        tls=tls_section(pki["master"]),
    )
    return master_factory(config=config, state_dir=str(state_dir))


def raw_tls(master, settings: tlsmod.TlsSettings):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    return tlsmod.connect(sock, tlsmod.client_context(settings), "127.0.0.1")


def hello(sock, node_id: str, details: dict, role: str = "basic") -> dict:
    return p.client_handshake(
        sock, TEST_SECRET, kind=p.KIND_SLAVE, node_id=node_id, role=role, details=details
    )


def counters(master) -> dict:
    return master.cluster_state()["master"]["counters"]


def lines(caplog, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_a_certificate_naming_no_one_is_refused_and_counted_each_time(
    master_factory, make_config, pki, tmp_path, caplog
):
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    tls = master.cluster_state()["master"]["tls"]
    assert tls["enabled"] is True and tls["name"] == "master"
    ports = []
    for _ in range(2):
        plain = socket.create_connection(("127.0.0.1", master.port), timeout=10)
        ports.append(plain.getsockname()[1])
        sock = tlsmod.connect(plain, tlsmod.client_context(pki["nameless"]), "127.0.0.1")
        sock.settimeout(10)
        assert p.recv_message(sock) == {
            "type": p.ERROR,
            "code": p.E_IDENTITY,
            "message": "the certificate names no identity (subject commonName)",
        }
        sock.close()
    assert counters(master)["identity_refused_total"] == 2
    assert lines(caplog, "names no identity") == [
        f"peer 127.0.0.1:{port}: identity_mismatch:"
        " the certificate names no identity (subject commonName); closing"
        for port in ports
    ]


def test_a_failed_tls_handshake_names_the_peer(master_factory, make_config, pki, tmp_path, caplog):
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    port = sock.getsockname()[1]
    with pytest.raises((ssl.SSLError, OSError)):
        wrapped = tlsmod.connect(sock, tlsmod.client_context(pki["rogue-pi"]), "127.0.0.1")
        wrapped.recv(4)  # TLS 1.3: the refusal arrives after the client's handshake
    sock.close()
    wait_for(lambda: counters(master)["tls_failures_total"] == 1, what="the refusal counted")
    (line,) = lines(caplog, "TLS handshake failed")
    assert line.startswith(f"peer 127.0.0.1:{port}: TLS handshake failed: ")
    assert line.endswith("; closing")


def test_a_long_claimed_node_name_is_cut_in_the_refusal(
    master_factory, make_config, pki, tmp_path, caplog
):
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    plain = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    port = plain.getsockname()[1]
    sock = tlsmod.connect(plain, tlsmod.client_context(pki["pi-a"]), "127.0.0.1")
    with pytest.raises(p.ProtocolError) as refused:
        hello(sock, "node-a", {"node_name": "x" * 100})
    sock.close()
    assert refused.value.code == p.E_IDENTITY
    why = f"hello names node {'x' * 64!r} but the certificate is 'pi-a'"
    assert refused.value.message == why
    # The log line names the peer by what it claimed and by its certificate.
    assert lines(caplog, "hello names node") == [
        f"peer 127.0.0.1:{port} (node_id=node-a role=basic kind=slave certificate=pi-a):"
        f" identity_mismatch: {why}; closing"
    ]


def test_the_same_pi_reconnecting_keeps_its_node(
    master_factory, make_config, pki, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    first = raw_tls(master, pki["pi-a"])
    hello(first, "node-a", {"hostname": "pi-a"})
    # Its link broke unnoticed by the master: the Pi connects again with the same node id.
    second = raw_tls(master, pki["pi-a"])
    assert hello(second, "node-a", {"hostname": "pi-a"})["type"] == p.WELCOME
    first.settimeout(10)
    assert p.recv_message(first)["code"] == p.E_REPLACED
    assert counters(master)["replaced_total"] == 1
    assert counters(master)["identity_refused_total"] == 0
    assert lines(caplog, "forgotten") == []
    (entry,) = master.cluster_state()["nodes"]
    assert entry["node_id"] == "node-a" and entry["tls"]["name"] == "pi-a"
    first.close()
    second.close()


def test_a_reinstalled_pi_forgets_its_old_node_with_the_reason(
    master_factory, make_config, pki, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    old = raw_tls(master, pki["pi-a"])
    hello(old, "old-id", {"hostname": "pi-a"})
    p.send_frame(old, p.make(p.GOODBYE, reason="reinstalling"))
    old.close()
    wait_for(
        lambda: [n["state"] for n in master.cluster_state()["nodes"]] == ["left"],
        what="the old node left",
    )
    new = raw_tls(master, pki["pi-a"])
    hello(new, "new-id", {"hostname": "pi-a"})
    assert [n["node_id"] for n in master.cluster_state()["nodes"]] == ["new-id"]
    assert lines(caplog, "forgotten (") == [
        "node old-id forgotten (certificate 'pi-a' now speaks as node new-id);"
        " 0 connection(s) closed"
    ]
    new.close()


def test_a_node_known_from_before_tls_is_bound_to_its_certificate(
    master_factory, make_config, pki, tmp_path, cluster_secret
):
    state_dir = tmp_path / "m"
    plain = master_factory(cluster=QUIET, state_dir=str(state_dir))
    sock = socket.create_connection(("127.0.0.1", plain.port), timeout=10)
    p.client_handshake(sock, cluster_secret, kind=p.KIND_SLAVE, node_id="node-a", role="basic")
    p.send_frame(sock, p.make(p.GOODBYE, reason="moving to TLS"))
    sock.close()
    wait_for(lambda: plain.cluster_state()["nodes"][0]["state"] == "left", what="left")
    plain.stop()
    master = tls_master(master_factory, make_config, pki, state_dir)
    assert master.cluster_state()["nodes"][0]["node_id"] == "node-a"
    sock = raw_tls(master, pki["pi-a"])
    assert hello(sock, "node-a", {"hostname": "pi-a"})["type"] == p.WELCOME
    (entry,) = master.cluster_state()["nodes"]
    assert entry["tls"]["name"] == "pi-a" and entry["state"] == "alive"
    sock.close()


def test_after_a_master_restart_a_reinstalled_pi_still_replaces_its_old_node(
    master_factory, make_config, pki, tmp_path, caplog
):
    """The certificate bindings are read back at start: the old node id is still known
    as pi-a's, so pi-a speaking as a new node id retires it."""
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    state_dir = tmp_path / "m"
    first = tls_master(master_factory, make_config, pki, state_dir)
    old = raw_tls(first, pki["pi-a"])
    hello(old, "old-id", {"hostname": "pi-a"})
    p.send_frame(old, p.make(p.GOODBYE, reason="reinstalling"))
    old.close()
    wait_for(lambda: first.cluster_state()["nodes"][0]["state"] == "left", what="left")
    first.stop()
    master = tls_master(master_factory, make_config, pki, state_dir)
    new = raw_tls(master, pki["pi-a"])
    hello(new, "new-id", {"hostname": "pi-a"})
    assert [n["node_id"] for n in master.cluster_state()["nodes"]] == ["new-id"]
    assert lines(caplog, "forgotten (") == [
        "node old-id forgotten (certificate 'pi-a' now speaks as node new-id);"
        " 0 connection(s) closed"
    ]
    new.close()


def test_a_peer_that_never_starts_tls_is_closed_at_the_timeout_without_a_byte(
    master_factory, make_config, pki, tmp_path, caplog
):
    """Nothing of the protocol crosses before the TLS handshake, the timeout's error frame
    included: the connection just ends, and the log says the TLS handshake was pending."""
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    port = sock.getsockname()[1]
    assert sock.recv(4096) == b""  # the end of the connection, not a frame, nor no end
    assert counters(master)["handshake_timeouts_total"] == 1
    limit = master.config.cluster.handshake_timeout
    assert lines(caplog, "no valid hello") == [
        f"peer 127.0.0.1:{port}: handshake_timeout: no valid hello within {limit:g} s,"
        " TLS handshake not finished; closing"
    ]
    sock.close()


@pytest.mark.parametrize(
    ("details", "bound"),
    [
        ({"tls": {"name": "pi-a", "not_after": 1.0}}, "pi-a"),
        ({"tls": {"name": 42}}, ""),  # a damaged record binds no one
        ({"tls": {"name": None}}, ""),
        ({"tls": "pi-a"}, ""),
        ({"node_name": "pi-a"}, ""),  # a name alone is a peer's word, not a binding
    ],
)
def test_only_a_tls_record_with_a_string_name_binds_a_node(details, bound):
    from types import SimpleNamespace

    from rpicluster.master.peertls import bound_identity

    assert bound_identity(SimpleNamespace(details=details)) == bound


def test_a_frame_in_the_same_read_as_the_end_of_the_tls_handshake_is_not_lost(
    master_factory, make_config, pki, tmp_path
):
    """The peer's Finished and its first frame in one write: the master challenges it,
    then answers that frame (here a bad first message) rather than dropping it."""
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tlsmod.client_context(pki["pi-a"]).wrap_bio(
        incoming, outgoing, server_hostname="127.0.0.1"
    )
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    tls.write(p.encode({"type": "ping"}))
    sock.sendall(outgoing.read())  # the Finished and the frame, one write

    while True:  # everything until the master closes the connection
        data = sock.recv(65536)
        if not data:
            break
        incoming.write(data)
    plain = b""
    while True:
        try:
            chunk = tls.read(65536)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            break
        if not chunk:
            break
        plain += chunk
    frames = [p.decode_body(body) for body in p.FrameDecoder(1 << 20).feed(plain)]
    challenge, error = frames
    assert challenge["type"] == p.CHALLENGE
    assert error == {
        "type": p.ERROR,
        "code": p.E_BAD_MESSAGE,
        "message": "expected a hello message first, got 'ping'",
    }
    sock.close()


def test_the_masters_tls_flights_restart_the_peers_turn_and_its_bytes_do_not(
    master_factory, make_config, pki, tmp_path
):
    """admission.py judges a pending peer by how long the master has waited on it: each
    TLS flight the master answers starts the peer's turn again (and the longest turn so
    far is kept); bytes of the peer after the handshake, a hello trickling in, do not."""
    master = tls_master(master_factory, make_config, pki, tmp_path / "m")
    now = [100.0]
    on_loop(master, lambda: setattr(master.admission, "clock", lambda: now[0]))

    def turns() -> list:
        return on_loop(master, lambda: [turn[:2] for turn in master.admission.turns.values()])

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tlsmod.client_context(pki["pi-a"]).wrap_bio(
        incoming, outgoing, server_hostname="127.0.0.1"
    )
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    wait_for(turns, what="the connection admitted")
    assert turns() == [(100.0, 0.0)]

    now[0] = 101.0
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock.sendall(outgoing.read())  # the ClientHello: the master answers with its flight
    while True:
        incoming.write(sock.recv(65536))
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    assert turns() == [(101.0, 1.0)]

    now[0] = 103.0
    sock.sendall(outgoing.read())  # the client's Finished: the master then challenges
    plain = b""
    while len(plain) < 4 or len(plain) < 4 + p.HEADER.unpack(plain[:4])[0]:
        incoming.write(sock.recv(65536))
        with contextlib.suppress(ssl.SSLWantReadError):
            plain += tls.read(65536)
    assert p.decode_body(plain[4:])["type"] == p.CHALLENGE
    assert turns() == [(103.0, 2.0)]

    now[0] = 110.0
    (conn,) = on_loop(master, lambda: list(master.admission.turns))
    tls.write(p.encode({"type": "hello"})[:6])  # the start of a hello, and no more yet
    sock.sendall(outgoing.read())
    wait_for(lambda: on_loop(master, lambda: conn.decoder.pending), what="the bytes read")
    assert turns() == [(103.0, 2.0)]
    sock.close()
