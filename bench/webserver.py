"""The ``webserver`` slave with 100 nodes in the registry: its RSS, CPU and page times.

Everything runs on 127.0.0.1. The master runs as a subprocess
(:class:`bench.simslaves.MasterProcess`). The 100 nodes are simulated here with
real protocol connections (challenge, HMAC hello, heartbeats every second and a
vitals reading every 5 s per node, like the ``vitals`` role's defaults); before
the webserver starts, each node sends one hour of past vitals (720 readings), so
the webserver holds a full history window, as on a fleet that has run for an hour.

The webserver is ``rpicluster-slave`` with ``roles = webserver`` in a Pi-like
Python (plain sys.path, as the wheel runs on a Pi; see bench.slave_footprint),
default ``refresh_interval`` (2 s) and ``history_window`` (1 h). Measured:

- RSS once the full history is loaded, and peak RSS after the page requests;
- CPU in % of one core over an idle window (refreshes only, no page views);
- each page's time as a client on 127.0.0.1 sees it over a kept-alive connection
  (request sent to last byte read: the server's render and send time plus a
  loopback round trip), median and p95, both freshly rendered (the first request
  in a new second) and from the server's per-second page cache (the next one).

With ``--attack`` it then attacks the same webserver as issue 7 did (see
:mod:`bench.webattack`: 1,100 idle sockets and 200 slowloris clients from this
process, on 127.0.0.1, bounded and self-stopping) and records ``/healthz``
latency from fresh connections, the webserver's RSS and threads during the
attack (targets: ``/healthz`` within 1 s, RSS < 96 MB).

    python -m bench.webserver --nodes 100 --seconds 30 [--attack]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import math
import os
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.report import append
from bench.simslaves import HOST, SECRET, MasterProcess, free_port, percentile, write_config
from bench.slave_footprint import CONSOLE_SCRIPT, pi_like_python
from bench.webattack import Attack, probe
from rpicluster import protocol as p

VITALS_INTERVAL = 5.0
HISTORY_SECONDS = 3600.0
PAGES = ("/", "/nodes/{node}", "/api/nodes", "/api/nodes/{node}", "/metrics", "/healthz")


def fake_vitals(ts: float, rng: random.Random, i: int) -> dict[str, Any]:
    """A plausible Raspberry Pi 4 reading (numbers only vary; shapes are the real ones)."""
    cpu = max(0.0, min(100.0, 15 + 10 * ((i * 7) % 5) + rng.gauss(0, 8)))
    return {
        "ts": round(ts, 3),
        "cpu_percent": round(cpu, 1),
        "cpu_freq_mhz": 1500.0,
        "load_1": round(cpu / 25, 2),
        "load_5": round(cpu / 30, 2),
        "load_15": round(cpu / 35, 2),
        "ram_available": int(2.5 * 2**30 + rng.gauss(0, 50) * 2**20),
        "ram_total": 4 * 2**30,
        "swap_free": 100 * 2**20,
        "disk_free": 20 * 2**30 - i * 2**28,
        "disk_total": 32 * 2**30,
        "uptime": round(ts - 1_700_000_000, 1),
        "temperature": round(45 + cpu / 5 + rng.gauss(0, 1), 1),
    }


class SimFleet:
    """``count`` nodes with one ``vitals`` connection each, driven by one thread."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.rng = random.Random(42)
        self.socks: list[socket.socket] = []
        self.ids = [f"sim-{i:03d}" for i in range(count)]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sim-fleet", daemon=True)
        self.lock = threading.Lock()

    def connect(self) -> None:
        for i, node_id in enumerate(self.ids):
            sock = socket.create_connection((HOST, self.port), timeout=10)
            details = {
                "hostname": f"rpi-node-{i:03d}",
                "ram_total": 4 * 2**30,
                "cpu_model": "Cortex-A72",
                "cpu_cores": 4,
                "os": "Debian GNU/Linux 12 (bookworm)",
                "kernel": "6.1.0-rpi7-rpi-v8",
                "architecture": "aarch64",
            }
            p.client_handshake(
                sock, SECRET, kind=p.KIND_SLAVE, node_id=node_id, role="vitals", details=details
            )
            self.socks.append(sock)
        self.thread.start()

    def send(self, i: int, frame: bytes) -> None:
        with self.lock:
            self.socks[i].sendall(frame)

    def preload(self, seconds: float) -> int:
        """Send ``seconds`` of past vitals for every node, oldest first; return the count.

        Paced at the master's vitals rate per (node, role), 20 reports a second
        (docs/protocol.md "Limits"): sent at once, all but a burst would be refused.
        """
        now = time.time()
        stamps = [now - seconds + k * VITALS_INTERVAL for k in range(int(seconds // 5))]
        per_node = [
            [p.make(p.VITALS, vitals=fake_vitals(ts, self.rng, i)) for ts in stamps]
            for i in range(len(self.socks))
        ]
        step = 20
        for start in range(0, len(stamps), step):
            began = time.monotonic()
            for i, frames in enumerate(per_node):
                self.send(i, b"".join(frames[start : start + step]))
            time.sleep(max(0.0, 1.05 - (time.monotonic() - began)))
        return len(stamps) * len(self.socks)

    def _run(self) -> None:
        """Heartbeats every second, vitals every 5 s at each node's phase; drain replies."""
        seq = 0
        start = time.monotonic()
        count = len(self.socks)
        last_vitals = [start - VITALS_INTERVAL * i / count for i in range(count)]
        next_beat = start
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_beat:
                seq += 1
                beat = p.make(p.HEARTBEAT, seq=seq, sent_at=time.time())
                for i in range(count):
                    frame = beat
                    if now - last_vitals[i] >= VITALS_INTERVAL:
                        last_vitals[i] = now
                        frame += p.make(p.VITALS, vitals=fake_vitals(time.time(), self.rng, i))
                    self.send(i, frame)
                next_beat += 1.0
            readable, _, _ = select.select(self.socks, [], [], max(0.0, next_beat - now))
            for sock in readable:
                sock.recv(65536)  # acks: drained, not needed

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for sock in self.socks:
            sock.close()


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes, float]:
    """One request as a browser or Prometheus makes it (gzip accepted); body as sent."""
    start = time.perf_counter()
    conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
    response = conn.getresponse()
    body = response.read()
    return response.status, body, time.perf_counter() - start


def get_json(conn: http.client.HTTPConnection, path: str) -> tuple[int, Any]:
    status, body, _ = get(conn, path)
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    return status, json.loads(body) if status == 200 else None


def wait_loaded(web_port: int, sample: str, nodes: int, points: int, timeout: float) -> float:
    """Until the webserver shows every node and the sample node's full history."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            conn = http.client.HTTPConnection(HOST, web_port, timeout=10)
            status, doc = get_json(conn, "/api/nodes")
            if status == 200 and len(doc["nodes"]) >= nodes:
                status, doc = get_json(conn, f"/api/nodes/{sample}")
                if status == 200 and len(doc["history"]) >= points:
                    return time.monotonic() - start
            conn.close()
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the webserver did not load {nodes} nodes and their history in {timeout:g} s")


ATTACK_IDLE = 1100
ATTACK_SLOW = 200
ATTACK_READERS = 100
ATTACK_PROBES = 60
HEALTHZ_TARGET = 1.0  # seconds
RSS_TARGET = 96 * 2**20


def attack(web_port: int, handle: psutil.Process) -> tuple[list[str], bool]:
    """Idle and slowloris clients against the webserver; /healthz latency, RSS, threads."""
    rss_before = handle.memory_info().rss
    latencies: list[float] = []
    failed = 0
    rss_peak = rss_before
    threads_peak = handle.num_threads()
    start = time.monotonic()
    load_before = os.getloadavg()[0]
    attack = Attack(
        HOST, web_port, idle=ATTACK_IDLE, slow=ATTACK_SLOW, readers=ATTACK_READERS, max_seconds=120
    )
    with attack as held:
        opened = time.monotonic() - start
        for _ in range(ATTACK_PROBES):
            status, took = probe(HOST, web_port, "/healthz")
            if status == 200:
                latencies.append(took)
            else:
                failed += 1
            rss_peak = max(rss_peak, handle.memory_info().rss)
            threads_peak = max(threads_peak, handle.num_threads())
            time.sleep(0.25)
        page_status, page_took = probe(HOST, web_port, "/")
        closed = held.closed_by_server
    ms = [t * 1000 for t in latencies] or [float("nan")]
    met = (
        failed == 0
        and page_status == 200
        and max(ms) < HEALTHZ_TARGET * 1000
        and rss_peak < RSS_TARGET
    )
    mib = 2**20
    lines = [
        f"attack: {ATTACK_IDLE} idle sockets, {ATTACK_SLOW} slowloris clients (one header"
        f" byte per 0.5 s) and {ATTACK_READERS} clients that ask for / uncompressed with a"
        f" 4 KiB receive buffer and never read, opened in {opened:.1f} s from one process on"
        f" {HOST}; the server closed {closed} slowloris clients during the"
        f" {ATTACK_PROBES} probes; machine load average {load_before:.1f} before and"
        f" {os.getloadavg()[0]:.1f} after (2 cores shared with other sessions)",
        f"/healthz under attack, {ATTACK_PROBES} probes on fresh connections every 0.25 s:"
        f" {failed} failed; median {statistics.median(ms):.1f} ms, p95"
        f" {percentile(ms, 95):.1f} ms, max {max(ms):.1f} ms (target < {HEALTHZ_TARGET:g} s);"
        f" GET / under attack {page_status} in {page_took * 1000:.0f} ms",
        f"webserver under attack: RSS {rss_before / mib:.1f} MB before, peak"
        f" {rss_peak / mib:.1f} MB (target < {RSS_TARGET / mib:.0f} MB); threads peak"
        f" {threads_peak}; {'met' if met else 'MISSED'}",
    ]
    return lines, met


def measure(nodes: int, seconds: int, idle: float, with_attack: bool = False) -> list[str]:
    workdir = Path(tempfile.mkdtemp(prefix="rpicluster-webbench-"))
    port, web_port = free_port(), free_port()
    master = MasterProcess(write_config(str(workdir), port), str(workdir / "master.log"), port)
    web_cfg = workdir / "web.cfg"
    web_cfg.write_text(
        f"[cluster]\nsecret = {SECRET}\n"
        f"[slave]\nmaster_ip = {HOST}\nsocket_port = {port}\nroles = webserver\n"
        f"state_dir = {workdir / 'web-state'}\n"
        f"[webserver]\nwebserver_host = {HOST}\nwebserver_port = {web_port}\n"
    )
    fleet = SimFleet(port, nodes)
    web = None
    try:
        master.start()
        fleet.connect()
        started = time.monotonic()
        preloaded = fleet.preload(HISTORY_SECONDS)
        preload_s = time.monotonic() - started
        with open(workdir / "web.log", "w") as log:
            web = subprocess.Popen(
                [pi_like_python(workdir), "-c", CONSOLE_SCRIPT, "--config", str(web_cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        handle = psutil.Process(web.pid)
        sample = fleet.ids[nodes // 2]
        points = int(HISTORY_SECONDS // VITALS_INTERVAL) - 5
        load_s = wait_loaded(web_port, sample, nodes + 1, points, timeout=180)
        time.sleep(4.0)  # two more refreshes: steady state
        rss_loaded = handle.memory_info().rss
        cpu0, t0 = handle.cpu_times(), time.monotonic()
        rss_idle = []
        while time.monotonic() - t0 < idle:
            rss_idle.append(handle.memory_info().rss)
            time.sleep(1.0)
        cpu1, elapsed = handle.cpu_times(), time.monotonic() - t0
        idle_cpu = 100 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / elapsed
        conn = http.client.HTTPConnection(HOST, web_port, timeout=30)
        fresh: dict[str, list[float]] = {page: [] for page in PAGES}
        repeat: dict[str, list[float]] = {page: [] for page in PAGES}
        sizes: dict[str, int] = {}
        plain: dict[str, int] = {}
        for _ in range(seconds):
            # Pages are cached per snapshot and second: the first request of a page in a
            # new second renders it, the one right after is served from the cache.
            time.sleep(math.ceil(time.time()) - time.time() + 0.02)
            for page in PAGES:
                path = page.format(node=sample)
                for into in (fresh, repeat):
                    status, body, took = get(conn, path)
                    if status != 200:
                        raise SystemExit(f"GET {path} answered {status}")
                    into[page].append(took)
                sizes[page] = len(body)
                plain[page] = len(gzip.decompress(body)) if body[:2] == b"\x1f\x8b" else len(body)
        conn.close()
        rss_after = handle.memory_info().rss
        threads = handle.num_threads()
        attack_lines: list[str] = []
        if with_attack:
            attack_lines, _met = attack(web_port, handle)
        alive = web.poll() is None
    finally:
        if web is not None and web.poll() is None:
            web.terminate()
            web.wait(10)
        fleet.close()
        master.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not alive:
        raise SystemExit("the webserver process ended during the benchmark")
    mib = 2**20
    lines = [
        f"registry: {nodes} simulated nodes (real protocol connections on {HOST}) plus the"
        f" webserver's own; {preloaded} past vitals preloaded in {preload_s:.1f} s"
        f" ({int(HISTORY_SECONDS // VITALS_INTERVAL)} per node = 1 h at 5 s), live vitals"
        " every 5 s, heartbeats every 1 s",
        "webserver: rpicluster-slave roles=webserver, Pi-like Python, refresh_interval 2 s,"
        f" history_window 1 h; first full load of nodes and history took {load_s:.1f} s;"
        f" {threads} threads",
        f"webserver RSS with the full hour of history loaded: {rss_loaded / mib:.1f} MB;"
        f" median over the {elapsed:.0f} s idle window {statistics.median(rss_idle) / mib:.1f} MB;"
        f" after {2 * seconds * len(PAGES)} page requests {rss_after / mib:.1f} MB",
        f"webserver CPU while idle (refreshes only): {idle_cpu:.2f} % of one core",
    ]
    lines.append(
        f"page times over {seconds} s: each second, every page twice over one kept-alive"
        " connection: the first request renders (fresh), the second is served from the"
        " per-second cache; client-side time from request to last byte on 127.0.0.1,"
        " gzip accepted as browsers and Prometheus do"
    )
    for page in PAGES:
        first = [t * 1000 for t in fresh[page]]
        again = [t * 1000 for t in repeat[page]]
        lines.append(
            f"GET {page} ({plain[page] / 1024:.0f} KiB, {sizes[page] / 1024:.0f} KiB sent):"
            " fresh median"
            f" {statistics.median(first):.1f} ms, p95 {percentile(first, 95):.1f} ms;"
            f" cached median {statistics.median(again):.1f} ms, p95 {percentile(again, 95):.1f} ms"
        )
    return lines + attack_lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100, help="simulated nodes (default 100)")
    parser.add_argument(
        "--seconds", type=int, default=30, help="seconds of page requests (2 per page per second)"
    )
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU window")
    parser.add_argument(
        "--attack",
        action="store_true",
        help=f"then {ATTACK_IDLE} idle, {ATTACK_SLOW} slowloris and {ATTACK_READERS} non-reading"
        " clients; /healthz, RSS, threads",
    )
    args = parser.parse_args()
    if not 1 <= args.nodes <= 1000:
        parser.error("--nodes must be 1-1000")
    if not 5 <= args.seconds <= 600:
        parser.error("--seconds must be 5-600")
    if not 5 <= args.idle <= 600:
        parser.error("--idle must be 5-600 seconds")
    lines = measure(args.nodes, args.seconds, args.idle, args.attack)
    title = f"webserver: dashboard slave with {args.nodes} nodes in the registry"
    append(title + (", then under attack" if args.attack else ""), lines)
    return 1 if any("MISSED" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
