"""Prometheus for those who outgrow the dashboard (docs/prometheus.md).

- ``/api/http_sd`` is validated against Prometheus' documented HTTP SD format;
- the alert rules pass ``promtool check rules`` and ``promtool test rules``;
- the master's own ``/metrics`` passes ``promtool check metrics`` and keeps its
  bounds (connection cap, head size and time, one request per connection).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rpicluster.master import metrics as mm
from rpicluster.web import sd
from rpicluster.web.state import ClusterState
from tests.helpers import wait_for
from tests.test_web_metrics import promtool
from tests.test_web_server import ClusterRunner, fetch

DOCS = Path(__file__).resolve().parents[1] / "docs"
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def check_http_sd(status: int, headers: dict[str, str], body: bytes) -> list[dict[str, Any]]:
    """The requirements of https://prometheus.io/docs/prometheus/latest/http_sd/."""
    import json

    assert status == 200
    assert headers["Content-Type"].split(";")[0] == "application/json"
    doc = json.loads(body.decode("utf-8"))  # UTF-8, JSON
    assert isinstance(doc, list)  # a list of target groups, [] when none
    for group in doc:
        assert set(group) <= {"targets", "labels"} and "targets" in group
        assert isinstance(group["targets"], list) and group["targets"]
        for target in group["targets"]:
            assert re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:/\s]+):\d{1,5}", target), target
        labels = group.get("labels", {})
        assert isinstance(labels, dict)
        for name, value in labels.items():
            assert LABEL_NAME.match(name) and isinstance(value, str), (name, value)
            assert not name.startswith("__") or name.startswith("__meta_"), name
    return doc


def snapshot(nodes: list[dict[str, Any]]):
    return ClusterState(3600).replace(
        master={"hostname": "m"}, nodes=nodes, history={}, fetched_at=time.time()
    )


def test_http_sd_document_labels_every_node():
    nodes = [
        {"node_id": "a", "name": "pi-a", "hostname": "rpi-a", "address": "10.0.0.1",
         "state": "alive", "roles": ["vitals", "basic"], "groups": ["workers", "sensors"]},
        {"node_id": "b", "hostname": "rpi-b", "address": "fd00::2", "state": "dead",
         "roles": [], "details": {"groups": ["a,b"]}},
        {"node_id": "c", "hostname": "bad\nname\x1b[31m", "address": "10.0.0.3", "state": "left",
         "roles": ["x"]},
        {"node_id": "d", "address": "", "state": "dead"},  # no address: nothing to scrape
    ]  # fmt: skip
    doc = sd.targets_document(snapshot(nodes), 9100)
    assert [g["targets"] for g in doc] == [["10.0.0.1:9100"], ["[fd00::2]:9100"], ["10.0.0.3:9100"]]
    assert doc[0]["labels"] == {
        "name": "pi-a",
        "node_id": "a",
        "hostname": "rpi-a",
        "groups": ",sensors,workers,",
        "roles": ",basic,vitals,",
        "__meta_rpicluster_state": "alive",
        "__meta_rpicluster_address": "10.0.0.1",
    }
    assert doc[1]["labels"]["name"] == "rpi-b" and doc[1]["labels"]["groups"] == ",a_b,"
    assert doc[1]["labels"]["roles"] == ""
    assert "\n" not in doc[2]["labels"]["hostname"] and "\x1b" not in doc[2]["labels"]["hostname"]
    assert sd.targets_document(snapshot([])) == []


def test_http_sd_endpoint_of_a_live_dashboard(master, make_config, tmp_path):
    runner = ClusterRunner(make_config, tmp_path)
    cluster = runner.start(master)
    try:
        base = cluster.base
        status, headers, body = fetch(base, "/api/http_sd")
        doc = check_http_sd(status, headers, body)
        ids = {node.node_id for node in cluster.slaves} | {cluster.web.node_id}
        assert {g["labels"]["node_id"] for g in doc} == ids
        assert all(g["targets"][0] == "127.0.0.1:9100" for g in doc)
        roles = {g["labels"]["node_id"]: g["labels"]["roles"] for g in doc}
        assert roles[cluster.web.node_id] == ",webserver,"
        assert {roles[s.node_id] for s in cluster.slaves} == {",vitals,"}
        status, headers, body = fetch(base, "/api/http_sd?port=9256")
        assert {g["targets"][0] for g in check_http_sd(status, headers, body)} == {"127.0.0.1:9256"}
        for bad in ("0", "65536", "x", "-1"):
            assert fetch(base, f"/api/http_sd?port={bad}")[0] == 400
    finally:
        runner.stop()


# --------------------------------------------------------------- alert rules


def test_promtool_check_rules():
    done = subprocess.run(
        [promtool(), "check", "rules", str(DOCS / "prometheus" / "rpicluster-rules.yml")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and "SUCCESS: 9 rules found" in out, out


def test_promtool_test_rules():
    done = subprocess.run(
        [promtool(), "test", "rules", "rpicluster-rules.test.yml"],
        cwd=DOCS / "prometheus",
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and "SUCCESS" in out, out


def test_prometheus_doc_names_what_exists():
    text = (DOCS / "prometheus.md").read_text()
    for needle in ("/api/http_sd", "metrics_port", "rpicluster-rules.yml", "http_sd_configs"):
        assert needle in text


# ------------------------------------------------------- the master's /metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def metrics_master(master_factory):
    # A port free a moment ago can be taken meanwhile (another process's outgoing
    # connection gets one from the same range): try another few.
    for attempt in range(5):
        try:
            master = master_factory(
                master={"metrics_port": free_port()},
                alerts={"webhook_url": "http://127.0.0.1:9/never", "hold": 0},
            )
            break
        except OSError as exc:
            if "already in use" not in str(exc) or attempt == 4:
                raise
    assert master.metrics is not None
    return master


def scrape(port: int, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_master_metrics_pass_promtool(metrics_master):
    port = metrics_master.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == mm.CONTENT_TYPE
        text = answer.read()
    done = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    problems = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not problems.strip(), problems
    body = text.decode()
    for line in (
        "# TYPE rpicluster_master_connections_total counter",
        "# TYPE rpicluster_master_connections_open gauge",
        'rpicluster_master_nodes{state="alive"} 0',
        "rpicluster_master_store_ok 1",
        "rpicluster_master_alerts_firing 0",
        "# TYPE rpicluster_master_webhook_sent_total counter",
        "rpicluster_master_nodes_forgotten_total 0",
    ):
        assert line in body, line
    assert re.search(r'rpicluster_master_info\{version="[^"]+",hostname="[^"]+"\} 1', body)


def test_master_metrics_answers_only_get_metrics(metrics_master):
    port = metrics_master.metrics.port
    assert scrape(port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert scrape(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert scrape(port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    head = scrape(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert scrape(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000).startswith(b"HTTP/1.1 431 ")


def test_master_metrics_connection_cap_and_head_timeout(metrics_master, monkeypatch):
    monkeypatch.setattr(mm, "HEAD_TIMEOUT", 0.5)
    port = metrics_master.metrics.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(16)]
    wait_for(lambda: len(metrics_master.metrics.open) == 16, 5, what="16 open")
    extra = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert extra.recv(100) == b""  # closed at once
    wait_for(lambda: metrics_master.metrics.refused_total == 1, 5)
    for sock in idle:  # each is dropped once its head is overdue
        sock.settimeout(5)
        with _closed():
            assert sock.recv(100) == b""
        sock.close()
    wait_for(lambda: not metrics_master.metrics.open, 5, what="all closed")
    assert scrape(port).startswith(b"HTTP/1.1 200 ")  # and it serves again


class _closed:
    """A connection closed by the server: EOF or a reset, both fine."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is None or issubclass(kind, ConnectionResetError)


def test_metrics_port_is_validated():
    from rpicluster.config import ConfigError, parse_config

    base = f"[cluster]\nsecret = {'s' * 16}\n[master]\n"
    assert parse_config(base).master.metrics_port == 0  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"\[master\] metrics_port"):
        parse_config(base + "metrics_port = 70000\n")


def test_a_taken_metrics_port_stops_the_master_clearly(master_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"master metrics cannot listen on 127.0.0.1:{port}"):
            master_factory(master={"metrics_port": port})


def test_dashboard_metrics_carry_the_masters_alerts():
    from rpicluster.web.metrics import MetricsRenderer

    master = {
        "hostname": "m",
        "alerts": {"firing_count": 2, "webhook": {"enabled": True, "ok": False}},
    }
    snap = ClusterState(3600).replace(master=master, nodes=[], history={}, fetched_at=time.time())
    text = MetricsRenderer(lambda: snap, stale_after=30).render()
    assert b"rpicluster_master_alerts_firing 2.0" in text
    assert b"rpicluster_master_webhook_ok 0.0" in text
    done = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip()
