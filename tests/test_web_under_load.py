"""The dashboard under load (issue 7 §5): idle and slow clients cannot exhaust it.

The old thread-per-connection server gave 1,100 idle sockets 1,022 threads and
175 MB, and no health probe got an answer. Here a server process with the default
bounds (256 connections, 10 s header timeout) holds 50 nodes while 1,100 idle
sockets, 200 slowloris clients and 100 clients that never read their dashboard
attack it from this process; ``/healthz``
must keep answering within about a second, and the server's threads and RSS stay
bounded. Everything is on 127.0.0.1, bounded (bench.webattack.MAX_SOCKETS) and
stops by itself. The smaller behaviours (timeouts, eviction, 431, keep-alive,
malformed node ids) run against an in-process server with short timeouts.
"""

from __future__ import annotations

import json
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.webattack import Attack, probe
from rpicluster.web.http import MAX_CONNECTIONS, DashboardSettings, WebService
from rpicluster.web.state import ClusterState, History
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MIB = 2**20

SERVER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from rpicluster.web.http import DashboardSettings, WebService
from rpicluster.web.state import ClusterState, History
now = time.time()
state = ClusterState(3600)
nodes, history = [], {}
for i in range(50):
    node_id = f"node-{i:02d}"
    vitals = {"ts": now - 1, "cpu_percent": 10.0 + i, "temperature": 50.0, "ram_total": 4 << 30,
              "ram_available": 3 << 30, "load_1": 0.5, "disk_free": 20 << 30, "uptime": 1000.0}
    nodes.append({"node_id": node_id, "name": f"pi-{i:02d}", "hostname": "raspberrypi",
                  "roles": ["basic", "vitals"], "state": "alive", "connected": True,
                  "last_seen": now - 1, "details": {"os": "Debian 12"}, "vitals": vitals})
    points = [dict(vitals, ts=now - 3600 + k * 5) for k in range(720)]
    history[node_id] = History.empty().extended(points, now - 3600)
state.replace(master={"hostname": "m", "store": {"ok": True}}, nodes=nodes, history=history,
              fetched_at=now)
web = WebService("127.0.0.1", 0, state, DashboardSettings(2.0, 3600.0, 1e9))
web.start()
print(web.address[1], flush=True)
sys.stdin.read()
web.stop()
"""


@pytest.fixture()
def server_process() -> Iterator[tuple[int, psutil.Process]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(REPO)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        yield port, psutil.Process(proc.pid)
    finally:
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tcp_connections(handle: psutil.Process) -> int:
    """The process's TCP sockets (psutil renamed connections() to net_connections())."""
    method = getattr(handle, "net_connections", None) or handle.connections
    return len(method("tcp"))


def enough_file_descriptors(count: int) -> None:
    """Raise this process's soft open-files limit for the attack's sockets (not the server's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= count:
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        pytest.fail(f"the attack needs {count} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def test_healthz_answers_while_idle_slowloris_and_slow_reading_clients_attack(server_process):
    """1,100 idle sockets, 200 slowloris heads, 100 clients that never read a dashboard."""
    enough_file_descriptors(2048)
    port, handle = server_process
    status, _ = probe(HOST, port, "/")
    assert status == 200
    baseline_rss = handle.memory_info().rss
    latencies = []
    attack = Attack(HOST, port, idle=1100, slow=200, readers=100, max_seconds=90)
    with attack:
        # The server has taken every connection it will hold (it evicts the oldest).
        wait_for(
            lambda: tcp_connections(handle) >= MAX_CONNECTIONS - 5,
            timeout=30,
            what="the server holding its maximum of connections",
        )
        for _ in range(20):
            status, took = probe(HOST, port, "/healthz")
            assert status == 200, f"/healthz answered {status} under attack"
            latencies.append(took)
        page_status, page_took = probe(HOST, port, "/")
        threads = handle.num_threads()
        rss = handle.memory_info().rss
        connections = tcp_connections(handle)
        assert attack.refused < 1300  # the attack did connect
    assert page_status == 200
    # Bounded: 1 loop + 4 workers + the main thread (+ interpreter helpers).
    assert threads <= 8, threads
    assert rss < 96 * MIB, f"webserver RSS {rss / MIB:.1f} MB under attack"
    assert rss - baseline_rss < 32 * MIB, (baseline_rss / MIB, rss / MIB)
    assert connections <= MAX_CONNECTIONS + 1  # + the listening socket
    # About a second on a loaded 2-core machine; the median much less.
    assert max(latencies) < 2.0, latencies
    assert statistics.median(latencies) < 1.0, latencies
    assert page_took < 5.0


# ------------------------------------------------------- in-process behaviours


@pytest.fixture()
def web() -> Iterator[WebService]:
    state = ClusterState(3600)
    now = time.time()
    nodes = [
        {"node_id": "a", "name": "pi-a", "state": "alive", "last_seen": now, "vitals": {}},
        {"node_id": "negative", "name": "n", "state": "alive", "details": {"boot_time": -1e300}},
        {"node_id": "big", "name": "b", "state": "alive", "vitals": {"uptime": int("9" * 400)}},
    ]
    hist = {"a": History.empty().extended([{"ts": now - 5, "cpu_percent": 5.0}], now - 3600)}
    state.replace(master={"hostname": "m"}, nodes=nodes, history=hist, fetched_at=now)
    service = WebService(HOST, 0, state, DashboardSettings(2.0, 3600.0, 1e9))
    service.start()
    server = service.server
    assert server is not None
    # Short bounds so that the timeouts are seen in a test's time.
    server.header_timeout = 1.0
    server.send_timeout = 2.0
    server.max_connections = 8
    yield service
    service.stop()


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, read until the server closes (or ``timeout``)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return out
                out += chunk
        except socket.timeout:
            return out


def test_slowloris_gets_408_and_is_closed_after_the_header_timeout(web):
    port = web.address[1]
    start = time.monotonic()
    reply = raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    took = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:80]
    assert 0.9 < took < 5.0
    assert web.server.stats["request_timeouts_total"] >= 1


def test_idle_connection_is_closed_silently_after_the_header_timeout(web):
    start = time.monotonic()
    assert raw(web.address[1], b"") == b""
    assert time.monotonic() - start < 5.0


def test_oversized_head_gets_431(web):
    reply = raw(web.address[1], b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]


def test_at_the_cap_the_longest_waiting_connection_makes_room(web):
    port = web.address[1]
    idle = [socket.create_connection((HOST, port), timeout=5) for _ in range(8)]
    try:
        wait_for(lambda: web.server.stats["connections_open"] == 8, what="8 idle connections")
        status, _ = probe(HOST, port)
        assert status == 200
        assert web.server.stats["connections_evicted_total"] >= 1
        assert idle[0].recv(10) == b""  # the oldest idle one was closed
    finally:
        for sock in idle:
            sock.close()


def test_keep_alive_and_pipelined_requests(web):
    port = web.address[1]
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request + request + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3


def test_a_request_with_a_body_is_answered_then_closed(web):
    reply = raw(web.address[1], b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert reply.startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize(
    "path, status",
    [
        ("/nodes/negative", 200),  # boot_time -1e300: rendered, not a 500
        ("/nodes/big", 200),  # a 400-digit uptime
        ("/api/nodes/big", 200),
        ("/api/nodes", 200),
        ("/", 200),
        ("/metrics", 200),
        ("/nodes/nope", 404),
        ("/nodes/-1", 404),
        ("/nodes/%FF%FE", 404),  # not UTF-8
        ("/nodes/%ED%A0%80", 404),  # an encoded lone surrogate
        ("/nodes/%00", 404),
        ("/nodes/a/b", 404),
        ("/nodes/", 404),
        ("/nodes/" + "x" * 5000, 404),
        ("/api/nodes/%FF", 404),
        ("/api/nodes/..%2F..%2Fetc", 404),
    ],
)
def test_node_urls_are_404_never_500(web, path, status):
    got, _ = probe(HOST, web.address[1], path)
    assert got == status


def test_healthz_is_503_while_the_store_does_not_save(web):
    state = web.state
    snap = state.snapshot
    state.replace(
        master={"hostname": "m", "store": {"ok": False, "error": "disk full"}},
        nodes=list(snap.nodes),
        history=snap.history,
        fetched_at=time.time(),
    )
    reply = raw(web.address[1], b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503 ")
    doc: Any = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert doc["store_ok"] is False and doc["store"]["error"] == "disk full"


def test_server_metrics_count_connections(web):
    probe(HOST, web.address[1], "/healthz")
    reply = raw(web.address[1], b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert b"rpicluster_webserver_connections_open " in reply
    assert b"rpicluster_webserver_requests_total " in reply
