"""Benchmark: the master under each attack class of issue 7, with 100 good slaves.

The master runs as its own process (measured with psutil), 100 simulated slaves
heartbeat at 1 s (``bench.simslaves``), and a status client asks for the whole
cluster 5 times a second from 127.0.0.1 throughout. Each attack class runs in
its own process for ``--seconds`` seconds, from 127.0.x.y source addresses
(all of 127/8 is loopback on Linux; the network rule: loopback only):

- idle: 3,000 idle connections from 20 addresses (once enough to exhaust the
  master's 1,024 file descriptors), held open;
- preauth: 1,000 connections each sending 16 KiB - 1 of a frame and stalling
  (once up to 1 MiB buffered per connection);
- churn: connect-and-close as fast as possible from 20 addresses;
- flood: 5 members with the secret sending 64-key vitals as fast as they can
  (once 2.97 GB of master RSS in 50 s);
- poison: a member sending every poison value of the issue, reconnecting.

Per class: master RSS peak, master CPU, status latency (median, max, failures),
good slaves that lost their connection (false deaths), database growth.
Targets (issue 7): 0 crashes, 0 false deaths, status within 1 s throughout,
master RSS < 256 MB whatever the attack, database growth bounded.

    python -m bench.adversarial --slaves 100 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from bench import report
from bench.simslaves import (
    SECRET,
    Fleet,
    MasterProcess,
    free_port,
    raise_nofile,
    temp_state_dir,
    write_config,
)
from rpicluster import protocol as p
from rpicluster.client import ClientError, MasterClient

MB = 1024 * 1024


def _source(i: int, net: int) -> str:
    return f"127.0.{net}.{1 + i % 20}"


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def attack_idle(port: int, seconds: float) -> None:
    raise_nofile(8192)
    socks = []
    for i in range(3000):
        with contextlib.suppress(OSError):
            socks.append(_connect(port, _source(i, 10)))
    time.sleep(seconds)
    for sock in socks:
        sock.close()


def attack_preauth(port: int, seconds: float) -> None:
    raise_nofile(8192)
    chunk = struct.pack(">I", p.PREAUTH_MAX_FRAME_SIZE) + b"x" * (p.PREAUTH_MAX_FRAME_SIZE - 1)
    end = time.monotonic() + seconds
    socks: list[socket.socket] = []
    i = 0
    while time.monotonic() < end:  # keep refilling: the master evicts and times them out
        for _ in range(1000 - len(socks)):
            with contextlib.suppress(OSError):
                sock = _connect(port, _source(i, 11))
                sock.sendall(chunk)
                socks.append(sock)
            i += 1
        time.sleep(0.5)
        socks = [s for s in socks if _open(s)]
    for sock in socks:
        sock.close()


def _open(sock: socket.socket) -> bool:
    try:
        sock.setblocking(False)
        data = sock.recv(65536, socket.MSG_PEEK)
        sock.setblocking(True)
        if data == b"":
            sock.close()
            return False
        return True
    except BlockingIOError:
        sock.setblocking(True)
        return True
    except OSError:
        sock.close()
        return False


def attack_churn(port: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            sock = _connect(port, _source(i, 12))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        i += 1


def _member(port: int, node_id: str, role: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    p.client_handshake(sock, SECRET, kind="slave", node_id=node_id, role=role)
    return sock


def _flooder(port: int, k: int, seconds: float) -> None:
    frame = p.make(p.VITALS, vitals={f"k{i}": i * 1.5 for i in range(64)}) * 50
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock = _member(port, f"flooder-{k}", "vitals")
            while time.monotonic() < end:
                sock.sendall(frame)
        except (OSError, p.ProtocolError, p.DisconnectionError):
            time.sleep(0.2)  # closed as abusive: come back, as an attacker would


def attack_flood(port: int, seconds: float) -> None:
    threads = [threading.Thread(target=_flooder, args=(port, k, seconds)) for k in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


POISON = [
    b'{"type":"vitals","vitals":{"x":1e400}}',
    b'{"type":"vitals","vitals":{"x":' + b"9" * 400 + b"}}",
    b'{"type":"vitals","vitals":{"boot_time":-1e300,"bad":"\\ud800"}}',
    b'{"type":"vitals","vitals":{"x":' + b"[" * 600 + b"]" * 600 + b"}}",
    b'{"type":"action_error","error":"\\u001b[2J\\nforged\\ud800","count":1}',
]


def attack_poison(port: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for body in POISON:
            with contextlib.suppress(OSError, p.ProtocolError, p.DisconnectionError):
                sock = _member(port, "poison", "vitals")
                sock.settimeout(0.5)  # a cleaned action_error gets no answer
                sock.sendall(struct.pack(">I", len(body)) + body)
                with contextlib.suppress(OSError, p.ProtocolError, p.DisconnectionError):
                    p.recv_message(sock)
                sock.close()


ATTACKS: dict[str, Callable[[int, float], None]] = {
    "idle": attack_idle,
    "preauth": attack_preauth,
    "churn": attack_churn,
    "flood": attack_flood,
    "poison": attack_poison,
}


class Watch:
    """Status latency (5 Hz) and master RSS/CPU samples, from this process."""

    def __init__(self, port: int, master: MasterProcess) -> None:
        self.port = port
        self.master = master
        self.latencies: list[float] = []
        self.failures = 0
        self.rss: list[int] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._status, daemon=True),
            threading.Thread(target=self._rss, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _status(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                with MasterClient("127.0.0.1", self.port, SECRET, timeout=5) as client:
                    client.cluster_state()
                self.latencies.append(time.monotonic() - start)
            except ClientError:
                self.failures += 1
            self.stop.wait(0.2)

    def _rss(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                self.rss.append(self.master.rss())
            self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def db_bytes(state_dir: str) -> int:
    return sum(f.stat().st_size for f in Path(state_dir).glob("rpicluster.db*"))


def counters(port: int) -> dict[str, int]:
    with MasterClient("127.0.0.1", port, SECRET, timeout=30) as client:
        return client.query("cluster", limit=1)["master"]["counters"]


def alive(port: int) -> int:
    with MasterClient("127.0.0.1", port, SECRET, timeout=30) as client:
        nodes = client.cluster_state()["nodes"]
    return sum(1 for n in nodes if n["node_id"].startswith("good") and n["state"] == "alive")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slaves", type=int, default=100, help="good simulated slaves (100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per attack (10)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated classes")
    parser.add_argument("--no-append", action="store_true", help="do not write results.md")
    args = parser.parse_args()
    raise_nofile(16384)
    state_dir = temp_state_dir()
    port = free_port()
    config = write_config(state_dir, port)
    # The default per-address cap (64) applies here: the 100 good slaves ramp in
    # over 2 s, and the attackers meet the cap a real master has.
    text = Path(config).read_text().replace("max_unauthenticated_per_address = 4096", "")
    Path(config).write_text(text)
    master = MasterProcess(config, f"{state_dir}/master.log", port)
    master.start()
    fleet = Fleet(port=port, n=args.slaves, interval=1.0, processes=2, ramp=2.0, prefix="good")
    fleet.start()
    lines: list[str] = []
    ok = True
    try:
        deadline = time.monotonic() + 60
        while alive(port) < args.slaves:
            if time.monotonic() > deadline:
                raise SystemExit("the good slaves did not all join within 60 s")
            time.sleep(0.5)
        fleet.measure.set()
        base_rss = master.rss()
        lines.append(
            f"good slaves: {args.slaves} simulated (1 heartbeat/s) on 127.0.0.1; status client"
            f" (whole cluster, 5/s) from 127.0.0.1; attackers from 127.0.10-14.x;"
            f" {args.seconds:g} s per attack; master RSS before: {base_rss / MB:.1f} MB"
        )
        ctx = mp.get_context("spawn")
        for name in args.attacks.split(","):
            before = counters(port)
            db_before = db_bytes(state_dir)
            cpu_before = master.cpu_seconds()
            watch = Watch(port, master)
            started = time.monotonic()
            proc = ctx.Process(target=ATTACKS[name], args=(port, args.seconds), daemon=True)
            proc.start()
            proc.join(args.seconds + 60)
            if proc.is_alive():
                proc.kill()
            elapsed = time.monotonic() - started
            time.sleep(1.0)  # the master settles; its RSS afterwards is part of the record
            watch.close()
            after = counters(port)
            crashed = master.proc is None or master.proc.poll() is not None
            good = 0 if crashed else alive(port)
            lat = watch.latencies or [float("inf")]
            rss_peak = max(watch.rss or [0])
            delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
            shown = ", ".join(
                f"{k} +{v}"
                for k, v in sorted(delta.items())
                if k.endswith("_total") and k != "messages_total"
            )
            met = (
                not crashed
                and good == args.slaves
                and max(lat) < 1.0
                and watch.failures == 0
                and rss_peak < 256 * MB
            )
            ok = ok and met
            lines.append(
                f"{name}: master RSS peak {rss_peak / MB:.1f} MB, after {master.rss() / MB:.1f} MB;"
                f" master CPU {100 * (master.cpu_seconds() - cpu_before) / elapsed:.0f} % of one"
                f" core; status median {1000 * statistics.median(lat):.0f} ms, max"
                f" {1000 * max(lat):.0f} ms over {len(watch.latencies)} queries,"
                f" {watch.failures} failed; good slaves alive {good}/{args.slaves};"
                f" database +{(db_bytes(state_dir) - db_before) / MB:.2f} MB; {shown};"
                f" {'met' if met else 'MISSED'}"
            )
            print(lines[-1], flush=True)
            if crashed:
                break
        results = fleet.stop()
        lines.append(
            f"fleet: {results['disconnects']} good-slave disconnections (false deaths),"
            f" errors {sorted(set(results['errors']))}; master crashed:"
            f" {master.proc is None or master.proc.poll() is not None}"
        )
        ok = ok and results["disconnects"] == 0
        load = os.getloadavg()
        lines.append(
            f"machine load average during the run: {load[0]:.1f} (shared with other sessions)"
        )
        lines.append(
            f"targets (0 crashes, 0 false deaths, status < 1 s, RSS < 256 MB): "
            f"{'met' if ok else 'MISSED'}"
        )
    finally:
        fleet.stop_event.set()
        master.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    if args.no_append:
        print("\n".join(lines))
    else:
        report.append("adversarial: the master under attack with 100 good slaves", lines)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
