"""TLS with the cluster CA and per-node identity (docs/protocol.md section 13).

Real certificates made in tmp_path (tests/tlscerts.py), a real master on
127.0.0.1 and real slave threads: mutual TLS works; a certificate of another CA,
no certificate or the plain protocol is refused with a clear reason; a Pi's
certificate lets it speak only as itself; a rogue master gets nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.client import ClientError, MasterClient
from rpicluster.config import ConfigError, load_config
from rpicluster.master import Master
from rpicluster.slave import RpiBasicSlaveThread
from tests.conftest import TEST_CLUSTER, TEST_SECRET
from tests.helpers import wait_for
from tests.tlscerts import CA, tls_section


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A cluster CA with a master and two Pis, and a rogue CA with its own 'master'."""
    root = tmp_path_factory.mktemp("pki")
    ca = CA(root / "cluster")
    rogue = CA(root / "rogue", name="rogue CA")
    return {
        "ca": ca,
        "master": ca.master("master"),
        "pi-a": ca.issue("pi-a"),
        "pi-b": ca.issue("pi-b"),
        "rogue-master": rogue.master("master", ca_file=ca.path),
        "rogue-pi": rogue.issue("pi-a", ca_file=ca.path),
    }


@pytest.fixture
def tls_master(master_factory: Callable[..., Master], make_config, tmp_path, pki) -> Master:
    config = make_config(
        master={"socket_bind_ip": "127.0.0.1", "state_dir": str(tmp_path / "m"), "socket_port": 0},
        tls=tls_section(pki["master"]),
    )
    return master_factory(config=config)


def slave_for(
    master: Master, tmp_path: Path, name: str, settings: Optional[tlsmod.TlsSettings], **kw: Any
) -> RpiBasicSlaveThread:
    slave = RpiBasicSlaveThread(
        "127.0.0.1",
        master.port,
        secret=kw.pop("secret", TEST_SECRET),
        state_dir=str(tmp_path / f"slave-{name}"),
        heartbeat_interval=TEST_CLUSTER["heartbeat_interval"],
        dead_after=TEST_CLUSTER["dead_after"],
        reconnect_base=0.05,
        reconnect_cap=0.2,
        handshake_timeout=2,
        tls=settings,
        **kw,
    )
    slave.start()
    return slave


@pytest.fixture
def slaves():
    started: list[RpiBasicSlaveThread] = []
    yield started
    for slave in started:
        slave.stop()
    for slave in started:
        slave.join(5)


def node(master: Master, node_id: str) -> Optional[dict[str, Any]]:
    for entry in master.cluster_state()["nodes"]:
        if entry["node_id"] == node_id:
            return entry
    return None


def counter(master: Master, name: str) -> int:
    return master.cluster_state()["master"]["counters"][name]


def raw_tls(master: Master, settings: tlsmod.TlsSettings) -> tlsmod.TlsSocket:
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    return tlsmod.connect(sock, tlsmod.client_context(settings), "127.0.0.1")


def hello(sock: Any, node_id: str, details: dict[str, Any], role: str = "basic") -> dict[str, Any]:
    return p.client_handshake(
        sock, TEST_SECRET, kind=p.KIND_SLAVE, node_id=node_id, role=role, details=details
    )


# ---------------------------------------------------------------- it works


def test_mutual_tls_joins_and_binds_the_node_to_its_certificate(tls_master, tmp_path, pki, slaves):
    slave = slave_for(tls_master, tmp_path, "a", pki["pi-a"])
    slaves.append(slave)
    entry = wait_for(
        lambda: (n := node(tls_master, slave.node_id)) and n["state"] == "alive" and n,
        what="pi-a alive over TLS",
    )
    assert entry["details"]["node_name"] == "pi-a"
    assert entry["tls"]["name"] == "pi-a"
    assert 363 < entry["tls"]["days_left"] <= 366
    # Heartbeats keep flowing over TLS past dead_after.
    seen = tls_master.counters.messages_total
    wait_for(lambda: tls_master.counters.messages_total > seen + 10, what="heartbeats over TLS")
    assert node(tls_master, slave.node_id)["state"] == "alive"
    assert slave.last_rtt is not None


def test_status_client_with_the_masters_certificate(tls_master, pki):
    with MasterClient("127.0.0.1", tls_master.port, TEST_SECRET, tls=pki["master"]) as client:
        state = client.cluster_state()
    tls = state["master"]["tls"]
    assert tls["enabled"] is True and tls["name"] == "master"
    assert 363 < tls["days_left"] <= 366 and tls["ca_days_left"] > 3600
    assert state["master"]["counters"]["tls_failures_total"] == 0


def test_a_master_without_tls_reports_it_disabled(master, cluster_secret):
    with MasterClient("127.0.0.1", master.port, cluster_secret) as client:
        assert client.cluster_state()["master"]["tls"] == {"enabled": False}


# ------------------------------------------------------- refused at the door


def test_a_certificate_of_another_ca_is_refused_with_a_reason(
    tls_master, tmp_path, pki, slaves, caplog
):
    caplog.set_level(logging.WARNING)
    slave = slave_for(tls_master, tmp_path, "rogue", pki["rogue-pi"])
    slaves.append(slave)
    wait_for(lambda: counter(tls_master, "tls_failures_total") >= 2, what="refused handshakes")
    assert slave.connections == 0 and node(tls_master, slave.node_id) is None
    master_lines = [r.getMessage() for r in caplog.records if r.name == "rpicluster.master"]
    assert any("not signed by the cluster CA" in line for line in master_lines), master_lines
    slave_lines = [r.getMessage() for r in caplog.records if r.name == "rpicluster.slave"]
    assert any("refused" in line and "CA" in line for line in slave_lines), slave_lines


def test_no_certificate_is_refused_with_a_reason(tls_master, pki, caplog):
    caplog.set_level(logging.WARNING)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["master"].ca_file)
    sock = socket.create_connection(("127.0.0.1", tls_master.port), timeout=5)
    with pytest.raises((ssl.SSLError, OSError)):
        wrapped = tlsmod.connect(sock, context, "127.0.0.1")
        wrapped.recv(4)  # TLS 1.3: the refusal arrives after the client's handshake
    sock.close()
    wait_for(lambda: counter(tls_master, "tls_failures_total") == 1, what="refusal counted")
    assert any("sent no certificate" in r.getMessage() for r in caplog.records)


def test_the_plain_protocol_gets_nothing_from_a_tls_master(tls_master, caplog):
    """A plain client hears no challenge (no frame precedes TLS) and is timed out."""
    caplog.set_level(logging.WARNING)
    with pytest.raises(ClientError):
        MasterClient("127.0.0.1", tls_master.port, TEST_SECRET, timeout=3).connect()
    wait_for(lambda: counter(tls_master, "handshake_timeouts_total") == 1, what="timeout")
    assert any("TLS handshake not finished" in r.getMessage() for r in caplog.records)


def test_a_status_client_without_tls_config_fails_clearly(tls_master, pki):
    settings = tlsmod.TlsSettings(pki["rogue-pi"].ca_file, *_cert(pki["rogue-pi"]))
    with pytest.raises(ClientError, match="cluster CA"):
        MasterClient("127.0.0.1", tls_master.port, TEST_SECRET, tls=settings).connect()


def _cert(settings: tlsmod.TlsSettings) -> tuple[str, str]:
    return settings.cert_file, settings.key_file


# ---------------------------------------------------- a Pi speaks as itself


def test_a_pi_cannot_claim_another_node_name(tls_master, pki):
    sock = raw_tls(tls_master, pki["pi-a"])
    with pytest.raises(p.ProtocolError) as refused:
        hello(sock, "node-of-a", {"hostname": "pi-a", "node_name": "pi-b"})
    sock.close()
    assert refused.value.code == p.E_IDENTITY
    assert "pi-b" in refused.value.message and "pi-a" in refused.value.message
    assert counter(tls_master, "identity_refused_total") == 1
    assert node(tls_master, "node-of-a") is None


def test_a_pi_cannot_take_over_another_nodes_id(tls_master, tmp_path, pki, slaves):
    victim = slave_for(tls_master, tmp_path, "b", pki["pi-b"])
    slaves.append(victim)
    wait_for(lambda: (n := node(tls_master, victim.node_id)) and n["state"] == "alive")
    for _attempt in range(3):
        sock = raw_tls(tls_master, pki["pi-a"])
        with pytest.raises(p.ProtocolError) as refused:
            hello(sock, victim.node_id, {"hostname": "pi-b"})
        sock.close()
        assert refused.value.code == p.E_IDENTITY
        assert "belongs to certificate 'pi-b'" in refused.value.message
    assert counter(tls_master, "identity_refused_total") == 3
    # The victim was never kicked off: same connection, still pi-b, still alive.
    assert victim.connections == 1
    entry = node(tls_master, victim.node_id)
    assert entry["state"] == "alive" and entry["tls"]["name"] == "pi-b"
    assert counter(tls_master, "replaced_total") == 0


def test_one_certificate_holds_one_connected_node_id(tls_master, tmp_path, pki, slaves):
    first = slave_for(tls_master, tmp_path, "a1", pki["pi-a"])
    slaves.append(first)
    wait_for(lambda: (n := node(tls_master, first.node_id)) and n["state"] == "alive")
    sock = raw_tls(tls_master, pki["pi-a"])
    with pytest.raises(p.ProtocolError) as refused:
        hello(sock, "a-second-id", {})
    sock.close()
    assert refused.value.code == p.E_IDENTITY and "already speaks as node" in refused.value.message


def test_a_reinstalled_pi_with_a_new_node_id_replaces_its_old_entry(
    tls_master, tmp_path, pki, slaves
):
    old = slave_for(tls_master, tmp_path, "old", pki["pi-a"])
    wait_for(lambda: (n := node(tls_master, old.node_id)) and n["state"] == "alive")
    old.stop()
    old.join(5)
    wait_for(lambda: node(tls_master, old.node_id)["state"] == "left")
    new = slave_for(tls_master, tmp_path, "new", pki["pi-a"])
    slaves.append(new)
    wait_for(lambda: (n := node(tls_master, new.node_id)) and n["state"] == "alive")
    assert node(tls_master, old.node_id) is None
    names = [n["details"].get("node_name") for n in tls_master.cluster_state()["nodes"]]
    assert names == ["pi-a"]


def test_without_tls_a_peer_cannot_forge_the_certificate_record(master, cluster_secret):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    forged = {"hostname": "x", "tls": {"name": "pi-b", "not_after": 1e10}}
    p.client_handshake(
        sock, cluster_secret, kind=p.KIND_SLAVE, node_id="forger", role="basic", details=forged
    )
    entry = wait_for(lambda: node(master, "forger"))
    sock.close()
    assert "tls" not in entry and "tls" not in entry["details"]


# --------------------------------------------------- a rogue master learns nothing


class RogueMaster:
    """A TLS server with a certificate the slaves must refuse; records any plaintext."""

    def __init__(self, settings: tlsmod.TlsSettings) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(settings.cert_file, settings.key_file)
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.handshakes = 0
        self.plaintext = b""
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            sock.settimeout(2)
            server = tlsmod.ServerTls(self.context)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    plain = server.feed(data)
                    sock.sendall(server.output())
                    if server.ready:
                        self.handshakes += 1
                        challenge = p.make(p.CHALLENGE, protocol=2, nonce="0" * 32)
                        sock.sendall(server.encrypt(challenge))
                    self.plaintext += plain
            except (ssl.SSLError, OSError) as exc:
                self.failures.append(str(exc))
            finally:
                sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("who", ["rogue-master", "pi-b"])
def test_a_rogue_master_gets_no_byte_of_the_hello(tmp_path, pki, slaves, caplog, who):
    """Another CA's master, or a Pi of the fleet posing as the master: nothing is sent."""
    caplog.set_level(logging.ERROR)
    rogue = RogueMaster(pki[who])
    try:
        fake = type("M", (), {"port": rogue.port})()
        slave = slave_for(fake, tmp_path, "victim", pki["pi-a"])  # type: ignore[arg-type]
        slaves.append(slave)
        wait_for(lambda: rogue.accepted >= 3, what="the slave trying the rogue thrice")
        assert rogue.plaintext == b"" and slave.connections == 0
        lines = [r.getMessage() for r in caplog.records if r.name == "rpicluster.slave"]
        assert any("nothing sent" in line for line in lines), lines
    finally:
        rogue.close()


# ------------------------------------------------------------------ config


def test_config_tls_files_are_checked(make_config, pki, tmp_path):
    good = tls_section(pki["pi-a"])
    with pytest.raises(ConfigError, match=r"\[tls\] ca_file: .*file not found"):
        make_config(slave={"master_ip": "127.0.0.1"}, tls={**good, "ca_file": "/nonexistent"})
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(good["key_file"]).read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigError, match=r"\[tls\] key_file: .*mode 0644.*chmod 600"):
        make_config(slave={"master_ip": "127.0.0.1"}, tls={**good, "key_file": str(loose)})
    with pytest.raises(ConfigError, match=r"\[tls\] key_file: .* is not the key of"):
        make_config(
            slave={"master_ip": "127.0.0.1"},
            tls={**good, "key_file": pki["pi-b"].key_file},
        )
    with pytest.raises(ConfigError, match=r"\[tls\] cert_file: is required"):
        make_config(slave={"master_ip": "127.0.0.1"}, tls={"ca_file": good["ca_file"]})
    with pytest.raises(ConfigError, match=r"\[tls\] certfile: is not a known setting"):
        make_config(slave={"master_ip": "127.0.0.1"}, tls={**good, "certfile": "x"})
    config = make_config(slave={"master_ip": "127.0.0.1"}, tls=good)
    assert config.tls == pki["pi-a"]


def test_certificate_info_reads_name_and_expiry(pki):
    (info,) = tlsmod.certificate_info(pki["pi-a"].cert_file)
    assert info["name"] == "pi-a"
    assert 364 < tlsmod.days_left(info["not_after"]) <= 366


# ------------------------------------------------- the quick start rule


@pytest.mark.parametrize(
    ("section", "key", "address"),
    [
        ("master", "socket_bind_ip", "0.0.0.0"),
        ("master", "socket_bind_ip", "192.0.2.10"),
        ("slave", "master_ip", "192.0.2.10"),
        ("slave", "master_ip", "rpi-master.local"),
    ],
)
def test_a_plain_config_on_a_network_address_is_refused(tmp_path, pki, section, key, address):
    text = f"[cluster]\nsecret = {TEST_SECRET}\n[{section}]\n{key} = {address}\n"
    path = tmp_path / "rpicluster.cfg"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    # The whole message: what is wrong, and what to do about it.
    assert str(refused.value) == (
        f"{path}: [{section}] {key}: {address} is not a loopback address and there is no"
        " [tls] section: a fleet on a network needs TLS with the cluster CA (the Ansible"
        " roles set it up; docs/deploy.md), the plain protocol is for one machine only"
        " (127.0.0.1)"
    )
    # With [tls] the same address is fine.
    tls = "".join(f"{k} = {v}\n" for k, v in tls_section(pki["pi-a"]).items())
    path.write_text(text + "[tls]\n" + tls)
    assert load_config(str(path)).tls == pki["pi-a"]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "::1", "localhost"])
def test_a_plain_config_on_loopback_runs_as_before(tmp_path, address):
    path = tmp_path / "rpicluster.cfg"
    path.write_text(f"[cluster]\nsecret = {TEST_SECRET}\n[slave]\nmaster_ip = {address}\n")
    assert load_config(str(path)).tls is None


def test_the_quick_start_configs_load_unchanged():
    local = Path(__file__).resolve().parent.parent / "examples" / "local"
    for path in sorted(local.glob("*.cfg")):
        config = load_config(str(path))
        assert config.tls is None


# ------------------------------------------- days to expiry: status and dashboard


@pytest.mark.parametrize(
    ("days", "shown"),
    [(100, ""), (30.2, ""), (12.4, "cert expires in 12 d"), (-0.5, "CERT EXPIRED"), (None, "")],
)
def test_a_certificate_near_expiry_is_a_warning(days, shown):
    from rpicluster.status import cert_warning

    assert cert_warning({"name": "pi-a", "days_left": days}) == shown
    assert cert_warning(None) == ""


def test_status_shows_the_days_to_expiry(tls_master, tmp_path, pki, slaves, capsys):
    from rpicluster.cli import main

    slave = slave_for(tls_master, tmp_path, "a", pki["pi-a"])
    slaves.append(slave)
    wait_for(lambda: (n := node(tls_master, slave.node_id)) and n["state"] == "alive")
    config = tmp_path / "status.cfg"
    tls = "".join(f"{k} = {v}\n" for k, v in tls_section(pki["master"]).items())
    config.write_text(
        f"[cluster]\nsecret = {TEST_SECRET}\n[master]\nsocket_bind_ip = 127.0.0.1\n"
        f"socket_port = {tls_master.port}\nstate_dir = {tmp_path / 'unused'}\n[tls]\n{tls}"
    )
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tls: cert 36[45] d, CA 36(49|50) d", out), out
    assert main(["status", "--config", str(config), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert [n["tls"]["name"] for n in state["nodes"]] == ["pi-a"]


def test_wait_and_forget_speak_tls_with_the_config(tls_master, tmp_path, pki, slaves, capsys):
    """Every command reads [tls] from the config: status, wait, forget."""
    from rpicluster.cli import main

    slave = slave_for(tls_master, tmp_path, "a", pki["pi-a"])
    slaves.append(slave)
    config = tmp_path / "master.cfg"
    tls = "".join(f"{k} = {v}\n" for k, v in tls_section(pki["master"]).items())
    config.write_text(
        f"[cluster]\nsecret = {TEST_SECRET}\n[master]\nsocket_bind_ip = 127.0.0.1\n"
        f"socket_port = {tls_master.port}\nstate_dir = {tmp_path / 'unused'}\n[tls]\n{tls}"
    )
    assert main(["wait", "--config", str(config), "--nodes", "pi-a", "--timeout", "20"]) == 0
    slave.stop()
    slave.join(5)
    assert main(["wait", "--config", str(config), "--nodes", "pi-a", "--state", "left"]) == 0
    assert main(["forget", "pi-a", "--config", str(config)]) == 0
    assert "forgot node pi-a" in capsys.readouterr().out


def test_the_dashboard_shows_the_certificates():
    from rpicluster.web import dashboard
    from rpicluster.web.state import ClusterState

    master = {"hostname": "m", "tls": {"enabled": True, "days_left": 364.6, "ca_days_left": 3649}}
    node_doc = {
        "node_id": "n1",
        "name": "pi-a",
        "state": "alive",
        "roles": ["basic"],
        "details": {},
        "tls": {"name": "pi-a", "not_after": 1.0, "days_left": 12.2},
    }
    snap = ClusterState(3600).replace(master=master, nodes=[node_doc], history={}, fetched_at=1.0)
    page = dashboard.render_dashboard(snap, refresh_interval=2, history_window=3600, stale_after=30)
    assert "TLS: certificate 365 d, CA 3649 d" in page
    node_page = dashboard.render_node(
        snap, node_doc, refresh_interval=2, history_window=3600, stale_after=30
    )
    assert "<dt>certificate</dt><dd>pi-a, 12 days left</dd>" in node_page


def test_during_a_ca_rotation_old_and_new_certificates_talk(
    master_factory, make_config, tmp_path, pki, slaves
):
    """playbooks/rotate-ca.yml step 4: both CAs trusted, Pis renewed or not yet, all join."""
    new = CA(tmp_path / "new", name="rpicluster cluster CA 2026-11-29")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(Path(pki["ca"].path).read_bytes() + new.path.read_bytes())
    master_cert = new.master("master", ca_file=bundle)  # the master renewed first
    tls_master = master_factory(
        config=make_config(
            master={"socket_bind_ip": "127.0.0.1", "socket_port": 0}, tls=tls_section(master_cert)
        )
    )
    old_pi = tlsmod.TlsSettings(str(bundle), pki["pi-a"].cert_file, pki["pi-a"].key_file)
    new_pi = new.issue("pi-b", ca_file=bundle)
    pis = (("a", old_pi), ("b", new_pi))
    joined = [slave_for(tls_master, tmp_path, name, cred) for name, cred in pis]
    slaves.extend(joined)
    for slave in joined:
        wait_for(lambda s=slave: (n := node(tls_master, s.node_id)) and n["state"] == "alive")
    # Step 5: the old CA is no longer trusted; a Pi still on it is refused.
    only_new = master_factory(
        config=make_config(
            master={"socket_bind_ip": "127.0.0.1", "socket_port": 0},
            tls=tls_section(new.master("master2")),
        )
    )
    with pytest.raises(ClientError, match="cluster CA|refused|certificate"):
        MasterClient("127.0.0.1", only_new.port, TEST_SECRET, tls=old_pi).connect()


# --------------------------------------------------------- the dashboard login


def test_password_hashes_check_and_refuse():
    from rpicluster.web.auth import BasicAuth, hash_password, parse_hash

    stored = hash_password("correct horse", iterations=10_000)
    assert stored.startswith("pbkdf2_sha256$10000$") and "correct" not in stored
    auth = BasicAuth("admin", stored)

    def header(user: str, password: str) -> str:
        import base64

        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert auth.check(header("admin", "correct horse")) is True
    assert auth.check(header("admin", "correct horse")) is True  # from the cache
    assert auth.check(header("admin", "wrong")) is False
    assert auth.check(header("root", "correct horse")) is False
    assert auth.check(None) is False and auth.check("Bearer x") is False
    results = [auth.check(header("admin", f"guess-{i}")) for i in range(20)]
    assert None in results  # throttled after the burst, without hashing
    for bad in ("plain", "pbkdf2_sha256$10$c2FsdHNhbHQ=$" + "A" * 44, "md5$1$a$b"):
        with pytest.raises(ValueError):
            parse_hash(bad)


def test_the_login_is_configured_both_or_neither(make_config):
    from rpicluster.web.auth import hash_password

    slave = {"master_ip": "127.0.0.1"}
    with pytest.raises(ConfigError, match=r"\[webserver\] login_password_hash: is required"):
        make_config(slave=slave, webserver={"login_user": "admin"})
    with pytest.raises(ConfigError, match=r"\[webserver\] login_password_hash: is not a pbkdf2"):
        make_config(slave=slave, webserver={"login_user": "a", "login_password_hash": "secret"})
    stored = hash_password("pw-pw-pw-pw", iterations=10_000)
    config = make_config(
        slave=slave, webserver={"login_user": "admin", "login_password_hash": stored}
    )
    assert config.webserver.login_user == "admin"


def test_the_dashboard_asks_for_the_login(tls_master, tmp_path, make_config, pki):
    import base64
    import urllib.error
    import urllib.request

    from rpicluster.roles.webserver import WebserverSlaveThread
    from rpicluster.web.auth import hash_password

    stored = hash_password("pw-pw-pw-pw", iterations=10_000)
    config = make_config(
        slave={"master_ip": "127.0.0.1", "socket_port": tls_master.port},
        webserver={"login_user": "admin", "login_password_hash": stored},
        tls=tls_section(pki["pi-a"]),
    )
    web = WebserverSlaveThread(
        "127.0.0.1",
        tls_master.port,
        secret=TEST_SECRET,
        state_dir=str(tmp_path / "web"),
        config=config,
        tls=config.tls,
        webserver_host="127.0.0.1",
        webserver_port=0,
    )
    web.start()
    try:
        host, port = wait_for(lambda: _address(web), what="dashboard serving")
        base = f"http://{host}:{port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/", timeout=5)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Basic ")
        for path in ("/metrics", "/api/nodes"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(base + path, timeout=5)
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status in (200, 503)
        login = base64.b64encode(b"admin:pw-pw-pw-pw").decode()
        request = urllib.request.Request(f"{base}/", headers={"Authorization": f"Basic {login}"})
        assert urllib.request.urlopen(request, timeout=5).status == 200
    finally:
        web.stop()
        web.join(5)


def _address(web: Any) -> Any:
    try:
        return web.web_address
    except RuntimeError:
        return None


def test_only_the_masters_credential_may_forget(tls_master, tmp_path, pki, slaves):
    from rpicluster.client import QueryFailed

    slave = slave_for(tls_master, tmp_path, "b", pki["pi-b"])
    slaves.append(slave)
    wait_for(lambda: (n := node(tls_master, slave.node_id)) and n["state"] == "alive")
    with MasterClient("127.0.0.1", tls_master.port, TEST_SECRET, tls=pki["pi-a"]) as client:
        with pytest.raises(QueryFailed) as refused:
            client.forget("pi-b", force=True)
        own = tls_master.tls_status["name"]
        assert refused.value.code == "forbidden"
        # What to do, not only what is wrong: the operator is told where to run it.
        assert str(refused.value).endswith(
            f"forget needs the master's own credential ({own!r}), not 'pi-a': run it on the master"
        )
        assert len(client.cluster_state()["nodes"]) == 1  # reading is allowed
    with MasterClient("127.0.0.1", tls_master.port, TEST_SECRET, tls=pki["master"]) as client:
        assert client.forget("pi-b", force=True)["node_id"] == slave.node_id
