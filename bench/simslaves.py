"""Simulated slaves for the master's benchmarks, and the master as a measured subprocess.

A fleet of N slaves is spread over several worker processes; each worker runs one
asyncio loop with an ``asyncio.Protocol`` per slave that speaks the real protocol
(``rpicluster.protocol``: challenge, HMAC hello, welcome check, heartbeats) and
reconnects with the real slave's :class:`rpicluster.backoff.Backoff`. Heartbeats
are sent by one ticker per worker, each slave at its own phase, so the fleet
spreads its load evenly like a real one. Workers record registration times,
heartbeat round trips and reconnects, and send them to the parent at the end.

The master runs as a separate process (:class:`MasterProcess`), so its CPU and RSS
are measured alone with psutil. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import queue
import random
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil

from rpicluster import protocol as p
from rpicluster.backoff import Backoff

HOST = "127.0.0.1"  # the network rule: loopback only
SECRET = "bench-secret-0123456789abcdef"
TICK = 0.01  # seconds between two ticker runs of a worker
# With TLS (``--tls`` of the benches): the directory of the bench's cluster CA,
# the master's credential and one per simulated slave (its node id); inherited
# by the worker processes through the environment.
TLS_ENV = "RPICLUSTER_BENCH_TLS_DIR"


def tls_dir() -> str:
    return os.environ.get(TLS_ENV, "")


def enable_tls(directory: str, names: list[str]) -> None:
    """A cluster CA, the master's credential and one per name, as the roles make them.

    Each simulated slave needs its own certificate: the master binds a node id to
    one certificate and refuses a second connected node id for it.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tlscerts import CA

    ca = CA(Path(directory))
    ca.master("master")
    for name in names:
        ca.issue(name)
    os.environ[TLS_ENV] = directory


def tls_settings(name: str = "master") -> Any:
    from rpicluster.config import TlsSettings

    base = tls_dir()
    return TlsSettings(f"{base}/ca.crt", f"{base}/{name}.crt", f"{base}/{name}.key")


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (up to the hard limit); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ------------------------------------------------------------------ the master


def write_config(state_dir: str, port: int, **cluster: Any) -> str:
    """A master config file in ``state_dir``; ``cluster`` overrides [cluster] keys."""
    keys = {"secret": SECRET, **cluster}
    text = "[cluster]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    text += f"[master]\nsocket_bind_ip = {HOST}\nsocket_port = {port}\nstate_dir = {state_dir}\n"
    # Every simulated Pi shares 127.0.0.1: a real Pi holds one pending connection
    # per role, so the per-address cap (default 64) is raised for the bench alone.
    text += "max_unauthenticated_per_address = 4096\n"
    if tls_dir():
        settings = tls_settings()
        text += f"[tls]\nca_file = {settings.ca_file}\ncert_file = {settings.cert_file}\n"
        text += f"key_file = {settings.key_file}\n"
    path = Path(state_dir) / "master.cfg"
    path.write_text(text)
    return str(path)


_MASTER_CODE = textwrap.dedent(
    """
    import logging, os, resource, sys
    os.nice(int(sys.argv[3]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(filename=sys.argv[2], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rpicluster.config import load_config
    from rpicluster.master import Master
    Master(load_config(sys.argv[1], need="master")).run_forever()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class MasterProcess:
    """``rpicluster-master`` as a subprocess: start, wait until accepting, measure, stop."""

    def __init__(
        self,
        config_path: str,
        log_path: str,
        port: int,
        nice: int = 0,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.config_path = config_path
        self.env = env  # variables added for the master alone (its unit's Environment=)
        self.nice = nice  # < 0 (root only) shields the measured master from a busy machine
        self.log_path = log_path
        self.port = port
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.ps: Optional[psutil.Process] = None

    def start(self, timeout: float = 30.0) -> float:
        """Start the master; return the monotonic time it first accepted a connection."""
        # Its own session, so its own scheduling autogroup: on this shared machine the
        # master then gets a CPU share of its own instead of sharing one with its
        # simulated slaves (as a real master Pi would not).
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MASTER_CODE, self.config_path, self.log_path, str(self.nice)],
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"master exited with {code}; see {self.log_path}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return time.monotonic()
            except OSError:
                time.sleep(0.005)
        raise RuntimeError(f"master not accepting on {HOST}:{self.port} after {timeout:g} s")

    def cpu_seconds(self) -> float:
        assert self.ps is not None
        times = self.ps.cpu_times()
        return times.user + times.system

    def sched(self) -> tuple[float, float]:
        """Seconds its threads ran, and waited runnable for a CPU (Linux schedstat)."""
        assert self.proc is not None
        ran = waited = 0.0
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError):
                run_ns, wait_ns, _ = task.read_text().split()
                ran += int(run_ns) / 1e9
                waited += int(wait_ns) / 1e9
        return ran, waited

    def rss(self) -> int:
        assert self.ps is not None
        return self.ps.memory_info().rss

    def stop(self, timeout: float = 20.0, crash: bool = False) -> None:
        """SIGTERM (a planned stop: the master says goodbye), or SIGKILL with ``crash``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if crash:
            self.proc.kill()
            self.proc.wait(timeout)
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def dial(port: int, timeout: float, name: str = "master") -> Any:
    """A connected socket to the master, in TLS (``name``'s credential) when the bench is."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    if not tls_dir():
        return raw
    from rpicluster import tls

    try:
        return tls.connect(raw, tls.client_context(tls_settings(name)), HOST)
    except BaseException:
        raw.close()
        raise


def query_cluster(port: int, timeout: float = 30.0) -> dict[str, Any]:
    """The whole cluster document from the master, page by page (a ``client`` connection)."""
    with contextlib.closing(dial(port, timeout)) as sock:
        p.client_handshake(sock, SECRET, kind=p.KIND_CLIENT, node_id="bench", role="-")
        nodes: list[dict[str, Any]] = []
        offset: Optional[int] = 0
        data: dict[str, Any] = {}
        qid = 0
        while offset is not None:
            qid += 1
            p.send_frame(sock, p.make(p.QUERY, id=qid, what="cluster", offset=offset))
            reply = p.recv_message(sock)
            while reply["type"] != p.REPLY:
                reply = p.recv_message(sock)
            data = reply["data"]
            nodes += data["nodes"]
            offset = data["next_offset"]
        return {"master": data.get("master"), "nodes": nodes}


# ------------------------------------------------------------------ the slaves


class SimSlave(asyncio.Protocol):
    """One simulated slave connection (a node with one role)."""

    def __init__(self, worker: Worker, node_id: str, bucket: int) -> None:
        self.worker = worker
        self.node_id = node_id
        self.bucket = bucket
        self.backoff = Backoff(worker.backoff_base, worker.backoff_cap, worker.rng)
        self.transport: Optional[asyncio.Transport] = None
        self.decoder = p.FrameDecoder()
        self.registered = False
        self.server_nonce = ""
        self.nonce = ""
        self.seq = 0
        self.sent_at = 0.0
        self.awaiting = False
        self.context: Optional[ssl.SSLContext] = None
        self.tls: Any = None  # (SSLObject, incoming, outgoing) while a TLS connection lives

    def connect(self) -> None:
        task = self.worker.loop.create_task(
            self.worker.loop.create_connection(lambda: self, HOST, self.worker.port)
        )
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.worker.connect_failures += 1
            self._retry()

    def _retry(self) -> None:
        if not self.worker.stopping and not self.worker.loop.is_closed():
            self.worker.loop.call_later(self.backoff.next_delay(), self.connect)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.decoder = p.FrameDecoder()
        self.worker.connects.append(time.monotonic())
        if tls_dir():  # TLS over memory BIOs, as the master does (no 256 KiB buffer each)
            if self.context is None:
                settings = tls_settings(self.node_id)
                self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                self.context.load_verify_locations(settings.ca_file)
                self.context.load_cert_chain(settings.cert_file, settings.key_file)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = self.context.wrap_bio(incoming, outgoing, server_hostname=HOST)
            self.tls = (obj, incoming, outgoing)
            self._tls_step(b"")

    def _tls_step(self, data: bytes) -> bytes:
        obj, incoming, outgoing = self.tls
        if data:
            incoming.write(data)
        plain = b""
        try:
            if obj.version() is None:
                obj.do_handshake()
            while incoming.pending or obj.pending():
                plain += obj.read(65536)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self.worker.errors.append(f"tls: {exc.reason}")
            self.transport.abort()  # type: ignore[union-attr]
        out = outgoing.read()
        if out and self.transport is not None:
            self.transport.write(out)
        return plain

    def write(self, frame: bytes) -> None:
        if self.tls is None:
            self.transport.write(frame)  # type: ignore[union-attr]
            return
        obj, _, outgoing = self.tls
        obj.write(frame)
        self.transport.write(outgoing.read())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            data = self._tls_step(data)
            if not data:
                return
        for body in self.decoder.feed(data):
            message = p.decode_body(body)
            kind = message["type"]
            if kind == p.HEARTBEAT_ACK:
                if self.awaiting and message["seq"] == self.seq:
                    self.awaiting = False
                    if self.worker.measuring:
                        self.worker.rtts.append(time.monotonic() - self.sent_at)
            elif kind == p.CHALLENGE:
                self.server_nonce = message["nonce"]
                self.nonce = p.new_nonce()
                mac = p.hello_mac(
                    SECRET, self.server_nonce, self.nonce, p.KIND_SLAVE, self.node_id, "basic"
                )
                self.write(
                    p.make(
                        p.HELLO,
                        protocol=p.PROTOCOL_VERSION,
                        kind=p.KIND_SLAVE,
                        node_id=self.node_id,
                        role="basic",
                        nonce=self.nonce,
                        mac=mac,
                        details={"hostname": self.node_id, "simulated": True},
                    )
                )
            elif kind == p.WELCOME:
                expected = p.welcome_mac(SECRET, self.nonce, self.server_nonce)
                if not p.macs_equal(message["mac"], expected):
                    raise RuntimeError("master failed to prove the secret")
                self.registered = True
                self.backoff.reset()
                self.worker.registrations.append(time.monotonic())
            elif kind == p.GOODBYE:
                self.worker.goodbyes += 1
                self.backoff.spread_fully()  # as the real slave does
            elif kind == p.ERROR:
                self.worker.errors.append(message["code"])

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.registered and not self.worker.stopping:
            self.worker.disconnects += 1
        self.registered = False
        self.awaiting = False
        self.transport = None
        self.tls = None
        self._retry()

    def heartbeat(self, now: float) -> None:
        if not self.registered or self.transport is None or self.transport.is_closing():
            return
        if self.awaiting and self.worker.measuring:
            self.worker.late += 1  # the previous heartbeat was never acked
        self.seq += 1
        self.sent_at = now
        self.awaiting = True
        self.write(p.make(p.HEARTBEAT, seq=self.seq, sent_at=now))


@dataclass
class WorkerSpec:
    port: int
    node_ids: list[str]
    interval: float
    ramp: float  # seconds over which the first connections are spread
    backoff_base: float = 1.0
    backoff_cap: float = 5.0
    seed: int = 0
    nice: int = 0  # scheduling niceness of the process (negative needs root)


class Worker:
    """One process's share of the fleet."""

    def __init__(self, spec: WorkerSpec, measure: Any, stop: Any) -> None:
        self.spec = spec
        self.port = spec.port
        self.backoff_base = spec.backoff_base
        self.backoff_cap = spec.backoff_cap
        self.rng = random.Random(spec.seed)
        self.measure_event = measure
        self.stop_event = stop
        self.loop = asyncio.new_event_loop()
        self.stopping = False
        self.measuring = False
        self.rtts: list[float] = []
        self.registrations: list[float] = []
        self.connects: list[float] = []  # TCP connections established
        self.connect_failures = 0
        self.disconnects = 0
        self.goodbyes = 0
        self.late = 0
        self.errors: list[str] = []
        buckets = max(1, round(spec.interval / TICK))
        self.buckets: list[list[SimSlave]] = [[] for _ in range(buckets)]
        self.slaves = []
        for node_id in spec.node_ids:
            slave = SimSlave(self, node_id, self.rng.randrange(buckets))
            self.slaves.append(slave)
            self.buckets[slave.bucket].append(slave)

    async def main(self) -> None:
        for slave in self.slaves:
            self.loop.call_later(self.rng.uniform(0, self.spec.ramp), slave.connect)
        nbuckets = len(self.buckets)
        next_bucket = 0
        start = time.monotonic()
        ticks_done = 0
        checks = 0
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            due = int((now - start) / TICK)
            while ticks_done < due:  # catch up when the loop was late
                for slave in self.buckets[next_bucket]:
                    slave.heartbeat(now)
                next_bucket = (next_bucket + 1) % nbuckets
                ticks_done += 1
            checks += 1
            if checks % 10 == 0:
                self.measuring = self.measure_event.is_set()
                if self.stop_event.is_set():
                    break
        self.stopping = True
        for slave in self.slaves:
            if slave.transport is not None:
                slave.transport.abort()
        await asyncio.sleep(0.05)

    def results(self) -> dict[str, Any]:
        return {
            "rtts": self.rtts,
            "registrations": self.registrations,
            "connects": self.connects,
            "registered": sum(1 for s in self.slaves if s.registered),
            "connect_failures": self.connect_failures,
            "disconnects": self.disconnects,
            "goodbyes": self.goodbyes,
            "late": self.late,
            "errors": self.errors,
        }


def worker_main(spec: WorkerSpec, measure: Any, stop: Any, out: Any) -> None:
    raise_nofile(len(spec.node_ids) + 1024)
    os.setsid()  # a scheduling autogroup of its own, like the master's (see MasterProcess)
    if spec.nice:
        os.nice(spec.nice)
    # The load generator must not add pauses of its own to the round trips it
    # measures: a full collection over thousands of simulated slaves stalls this
    # loop for 50-160 ms (seen with gc.callbacks). A bounded run's cycles can wait.
    gc.disable()
    worker = Worker(spec, measure, stop)
    try:
        worker.loop.run_until_complete(worker.main())
    finally:
        out.put(worker.results())
        worker.loop.close()


@dataclass
class Fleet:
    """N simulated slaves over ``processes`` worker processes."""

    port: int
    n: int
    interval: float
    processes: int
    ramp: float = 5.0
    prefix: str = "sim"
    backoff_base: float = 1.0
    backoff_cap: float = 5.0
    nice: int = 0
    _ctx: Any = field(default=None, repr=False)
    _procs: list[Any] = field(default_factory=list, repr=False)

    def start(self) -> None:
        ctx = self._ctx = mp.get_context("spawn")
        self.measure = ctx.Event()
        self.stop_event = ctx.Event()
        self.out = ctx.Queue()
        ids = [f"{self.prefix}-{i:05d}" for i in range(self.n)]
        for k in range(self.processes):
            spec = WorkerSpec(
                port=self.port,
                node_ids=ids[k :: self.processes],
                interval=self.interval,
                ramp=self.ramp,
                backoff_base=self.backoff_base,
                backoff_cap=self.backoff_cap,
                seed=k + 1,
                nice=self.nice,
            )
            proc = ctx.Process(
                target=worker_main,
                args=(spec, self.measure, self.stop_event, self.out),
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
        return total

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop every worker; merged results."""
        self.stop_event.set()
        merged: dict[str, Any] = {
            "rtts": [],
            "registrations": [],
            "connects": [],
            "registered": 0,
            "connect_failures": 0,
            "disconnects": 0,
            "goodbyes": 0,
            "late": 0,
            "errors": [],
        }
        for _ in self._procs:
            try:
                part = self.out.get(timeout=timeout)
            except queue.Empty:
                merged["errors"].append("a slave process sent no results")
                continue
            for key, value in part.items():
                merged[key] = merged[key] + value
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
        return merged


def temp_state_dir() -> str:
    return tempfile.mkdtemp(prefix="rpicluster-bench-")


def cpu_count() -> int:
    return os.cpu_count() or 1
