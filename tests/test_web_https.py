"""HTTPS for the dashboard and /metrics (issue 8 §2): web/https.py inside web/server.py.

Real certificates of a cluster CA (tests/tlscerts.py), a real server on
127.0.0.1: pages and /metrics over HTTPS verified by the CA; a client that does
not trust the CA, or speaks plain HTTP to the port, is refused cleanly and the
server goes on; the login is still asked for; a stranger whose handshake stalls
is cut at the handshake timeout and strangers at the connection cap make room
for a real client. Plus the ``[webserver] https`` settings and the role itself.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from rpicluster.config import Config, ConfigError, load_config, parse_config
from rpicluster.web import https
from rpicluster.web.auth import BasicAuth, hash_password
from rpicluster.web.http import DashboardSettings, WebService
from rpicluster.web.state import ClusterState
from tests.conftest import TEST_SECRET
from tests.helpers import wait_for
from tests.tlscerts import CA, tls_section

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A cluster CA and the webserver Pi's credential as the roles issue it with HTTPS on."""
    root = tmp_path_factory.mktemp("pki")
    ca = CA(root / "cluster")
    return {
        "ca": ca,
        "web": ca.issue("rpi-node-02", server=True, ips=(HOST,)),
        "master": ca.master("master"),
        "rogue": CA(root / "rogue", name="rogue CA"),
    }


def start_web(pki: dict[str, Any], auth: Optional[BasicAuth] = None) -> WebService:
    state = ClusterState(3600)
    now = time.time()
    nodes = [{"node_id": "a", "name": "pi-a", "state": "alive", "last_seen": now, "vitals": {}}]
    state.replace(master={"hostname": "m"}, nodes=nodes, history={}, fetched_at=now)
    context = https.server_context(pki["web"].cert_file, pki["web"].key_file)
    service = WebService(
        HOST, 0, state, DashboardSettings(2.0, 3600.0, 1e9, auth), ssl_context=context
    )
    service.start()
    return service


@pytest.fixture
def web(pki) -> Iterator[WebService]:
    service = start_web(pki)
    yield service
    service.stop()


def trusting(ca: CA) -> ssl.SSLContext:
    """What a browser or Prometheus given the cluster's ca.crt does."""
    return ssl.create_default_context(cafile=str(ca.path))


def get(url: str, ca: CA, headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=trusting(ca)) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def until_closed(sock: socket.socket, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (at most ``limit`` s)."""
    sock.settimeout(limit)
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


# ------------------------------------------------------------------ it works


def test_pages_and_metrics_over_https_verified_by_the_cluster_ca(web, pki):
    base = f"https://{HOST}:{web.address[1]}"
    status, page = get(f"{base}/", pki["ca"])
    assert status == 200 and b"pi-a" in page
    status, metrics = get(f"{base}/metrics", pki["ca"])
    assert status == 200
    assert b'rpicluster_node_up{name="pi-a",node_id="a"} 1.0' in metrics
    assert b"rpicluster_webserver_tls_handshake_failures_total 0.0" in metrics
    status, _ = get(f"{base}/healthz", pki["ca"])
    assert status == 200
    # Keep-alive over TLS: two requests on one connection.
    with (
        socket.create_connection((HOST, web.address[1]), timeout=10) as raw,
        trusting(pki["ca"]).wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        for _ in range(2):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = read_response(tls)
            assert head.startswith(b"HTTP/1.1 200 "), head[:80]
            assert json.loads(body)["status"] == "ok"


def read_response(sock: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One HTTP response with a Content-Length: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_a_client_that_does_not_trust_the_ca_is_refused_and_the_server_goes_on(web, pki):
    base = f"https://{HOST}:{web.address[1]}"
    with pytest.raises(urllib.error.URLError) as refused:
        get(f"{base}/", pki["rogue"])
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    wait_for(lambda: web.server.stats["tls_handshake_failures_total"] == 1, what="counted")
    assert get(f"{base}/healthz", pki["ca"])[0] == 200
    assert web.server.stats["connections_open"] <= 1


def test_plain_http_to_the_https_port_gets_a_plain_400_and_is_closed(web, pki):
    port = web.address[1]
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = until_closed(sock, 10)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply[:80]
    assert https.PLAIN_HTTP_REASON.encode() in reply
    assert web.server.stats["tls_plain_http_refused_total"] == 1
    assert get(f"https://{HOST}:{port}/healthz", pki["ca"])[0] == 200


def test_the_login_is_still_asked_for_over_https(pki):
    auth = BasicAuth("admin", hash_password("pw-pw-pw-pw", iterations=10_000))
    service = start_web(pki, auth)
    try:
        base = f"https://{HOST}:{service.address[1]}"
        for path in ("/", "/metrics", "/api/nodes"):
            assert get(base + path, pki["ca"])[0] == 401, path
        wrong = base64.b64encode(b"admin:wrong").decode()
        assert get(f"{base}/", pki["ca"], {"Authorization": f"Basic {wrong}"})[0] == 401
        assert get(f"{base}/healthz", pki["ca"])[0] == 200
        good = base64.b64encode(b"admin:pw-pw-pw-pw").decode()
        status, page = get(f"{base}/", pki["ca"], {"Authorization": f"Basic {good}"})
        assert status == 200 and b"pi-a" in page
    finally:
        service.stop()


# ------------------------------------------------------------------- bounds


def test_a_stalled_handshake_is_cut_at_the_handshake_timeout(web, pki):
    server = web.server
    server.handshake_timeout = 1.0
    port = web.address[1]
    with (
        socket.create_connection((HOST, port), timeout=10) as silent,
        socket.create_connection((HOST, port), timeout=10) as partial,
    ):
        # The first bytes of a ClientHello record, then nothing: a slow stranger.
        partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        start = time.monotonic()
        assert until_closed(partial, 10) == b""
        assert until_closed(silent, 10) == b""
        took = time.monotonic() - start
    assert 0.8 < took < 5.0, took
    assert server.stats["tls_handshake_failures_total"] == 2
    wait_for(lambda: server.stats["connections_open"] == 0, what="both closed")
    assert get(f"https://{HOST}:{port}/healthz", pki["ca"])[0] == 200


def test_stalled_handshakes_at_the_cap_make_room_for_a_real_client(web, pki):
    server = web.server
    server.max_connections = 4
    port = web.address[1]
    strangers = [socket.create_connection((HOST, port), timeout=10) for _ in range(4)]
    try:
        for sock in strangers:
            sock.sendall(b"\x16\x03\x01")
        wait_for(lambda: server.stats["connections_open"] == 4, what="four strangers held")
        assert get(f"https://{HOST}:{port}/healthz", pki["ca"])[0] == 200
        assert server.stats["connections_evicted_total"] >= 1
        assert server.stats["connections_open"] <= 4
        # The oldest stranger made room: the server closed it.
        assert until_closed(strangers[0], 10) == b""
    finally:
        for sock in strangers:
            sock.close()


# ----------------------------------------------------------------- settings


def write(path: Any, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def copy_key(source: str, path: Any, mode: int) -> str:
    with open(source) as handle:
        return write(path, handle.read(), mode)


def test_https_is_off_by_default_and_serves_the_nodes_own_credential(make_config, pki):
    plain = make_config(slave={"master_ip": HOST}, webserver={})
    assert (plain.webserver.https, plain.webserver.https_cert_file) == (False, "")
    config = make_config(
        slave={"master_ip": HOST}, webserver={"https": "yes"}, tls=tls_section(pki["web"])
    )
    assert config.webserver.https
    assert config.webserver.https_cert_file == pki["web"].cert_file
    assert config.webserver.https_key_file == pki["web"].key_file


def test_https_settings_are_refused_with_file_section_and_key(make_config, pki, tmp_path):
    def refusal(**webserver: str) -> str:
        with pytest.raises(ConfigError) as caught:
            make_config(slave={"master_ip": HOST}, webserver=webserver)
        return str(caught.value).split(": ", 1)[1]

    assert refusal(https="maybe") == "[webserver] https: 'maybe' is not yes or no"
    assert refusal(https="yes") == (
        "[webserver] https_cert_file: is required when https = yes and there is no [tls]"
        " section (without it the Pi's own certificate of the cluster CA is served)"
    )
    cert, key = pki["web"].cert_file, pki["web"].key_file
    assert refusal(https="yes", https_cert_file=cert) == (
        "[webserver] https_key_file: is required when the other one is set"
    )
    assert refusal(https="no", https_key_file=key) == (
        "[webserver] https_cert_file: is required when the other one is set"
    )
    missing = str(tmp_path / "missing.crt")
    assert refusal(https="yes", https_cert_file=missing, https_key_file=key) == (
        f"[webserver] https_cert_file: {missing}: file not found"
    )
    open_key = copy_key(key, tmp_path / "open.key", 0o644)
    assert refusal(https="yes", https_cert_file=cert, https_key_file=open_key) == (
        f"[webserver] https_key_file: {open_key} is readable by others (mode 0644);"
        f" chmod o-rwx {open_key}"
    )
    other_key = pki["master"].key_file
    assert refusal(https="yes", https_cert_file=cert, https_key_file=other_key) == (
        f"[webserver] https_key_file: {other_key} is not the key of {cert}"
    )
    junk = write(tmp_path / "junk.crt", "not a certificate\n", 0o644)
    assert refusal(https="yes", https_cert_file=junk, https_key_file=key).startswith(
        f"[webserver] https_cert_file: {junk} / {key}: not a PEM certificate and key"
    )
    # A configured pair is served even without [tls]; 0640 (group rpicluster) is fine.
    group_key = copy_key(key, tmp_path / "group.key", 0o640)
    config = make_config(
        slave={"master_ip": HOST},
        webserver={"https": "on", "https_cert_file": cert, "https_key_file": group_key},
    )
    assert (config.webserver.https_cert_file, config.webserver.https_key_file) == (cert, group_key)


def test_relative_https_files_are_found_beside_the_config_file(pki, tmp_path, monkeypatch):
    """As [tls]'s files: beside a config file, against the working directory for text."""
    etc = tmp_path / "etc"
    etc.mkdir()
    copy_key(pki["web"].cert_file, etc / "web.crt", 0o644)
    copy_key(pki["web"].key_file, etc / "web.key", 0o600)
    text = (
        f"[cluster]\nsecret = {TEST_SECRET}\n[slave]\nmaster_ip = {HOST}\n"
        "[webserver]\nhttps = yes\nhttps_cert_file = web.crt\nhttps_key_file = web.key\n"
    )
    path = write(etc / "rpicluster.cfg", text, 0o644)

    def files(config: Config) -> tuple[str, str]:
        assert config.webserver.https
        return config.webserver.https_cert_file, config.webserver.https_key_file

    monkeypatch.chdir(tmp_path)  # not where the files are
    assert files(load_config(path)) == (str(etc / "web.crt"), str(etc / "web.key"))
    assert files(load_config("etc/rpicluster.cfg")) == ("etc/web.crt", "etc/web.key")
    monkeypatch.chdir(etc)
    assert files(parse_config(text)) == ("web.crt", "web.key")
    assert files(parse_config(text, "<cli>")) == ("web.crt", "web.key")
    # Absolute paths are kept as written, wherever the config is.
    cert, key = pki["web"].cert_file, pki["web"].key_file
    absolute = text.replace("= web.crt", f"= {cert}").replace("= web.key", f"= {key}")
    assert files(parse_config(absolute, path)) == (cert, key)


def test_the_webserver_role_serves_https_with_the_pis_credential(
    master_factory, make_config, tmp_path, pki
):
    """The role as deployed: [tls] for the master connection, the same pair for HTTPS."""
    from rpicluster.roles.webserver import WebserverSlaveThread

    master = master_factory(
        config=make_config(
            master={"socket_bind_ip": HOST, "socket_port": 0}, tls=tls_section(pki["master"])
        )
    )
    config = make_config(
        slave={"master_ip": HOST, "socket_port": master.port},
        webserver={"https": "yes"},
        tls=tls_section(pki["web"]),
    )
    web = WebserverSlaveThread(
        HOST,
        master.port,
        secret=TEST_SECRET,
        state_dir=str(tmp_path / "web"),
        config=config,
        tls=config.tls,
        webserver_host=HOST,
        webserver_port=0,
    )
    web.start()
    try:
        port = wait_for(lambda: _port(web), what="dashboard serving")

        def listed() -> bool:
            status, body = get(f"https://{HOST}:{port}/api/nodes", pki["ca"])
            names = [n.get("name") for n in json.loads(body)["nodes"]] if status == 200 else []
            return "rpi-node-02" in names

        wait_for(listed, what="the webserver Pi listed over HTTPS")
    finally:
        web.stop()
        web.join(5)


def _port(web: Any) -> Optional[int]:
    try:
        return web.web_address[1]
    except RuntimeError:
        return None
