"""Idle and slowloris clients against the dashboard, bounded and loopback only.

Used by tests/test_web_under_load.py and ``python -m bench.webserver --attack``.
What issue 7 found: 1,100 idle sockets made every health probe time out and grew
the old thread-per-connection server to 175 MB and 1,022 threads. This module
opens such sockets (``idle``), slowloris clients (``slow``) that send a
request head one byte at a time and never finish it, and slow readers
(``readers``) that ask for the uncompressed dashboard with a tiny receive buffer
and never read it; ``probe`` measures ``/healthz`` from fresh connections meanwhile.

Bounded and self-stopping: at most MAX_SOCKETS sockets, only to 127.0.0.1 / ::1,
and everything is closed by :meth:`Attack.stop` or, at the latest, after
``max_seconds`` by the trickle thread itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Optional

MAX_SOCKETS = 2000
LOOPBACK = ("127.0.0.1", "::1", "localhost")
SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: "


class Attack:
    """``idle`` connections that send nothing and ``slow`` ones that trickle a head."""

    def __init__(
        self,
        host: str,
        port: int,
        idle: int,
        slow: int,
        readers: int = 0,
        trickle_interval: float = 0.5,
        max_seconds: float = 120.0,
    ) -> None:
        if host not in LOOPBACK:
            raise ValueError(f"attacks go to loopback only, not {host!r}")
        if not 0 <= idle + slow + readers <= MAX_SOCKETS:
            raise ValueError(f"at most {MAX_SOCKETS} sockets")
        self.host, self.port = host, port
        self.idle, self.slow, self.readers = idle, slow, readers
        self.trickle_interval = trickle_interval
        self.max_seconds = max_seconds
        self.sockets: list[socket.socket] = []
        self.slow_sockets: list[socket.socket] = []
        self.refused = 0  # connects that failed (the server may close them at once)
        self.closed_by_server = 0  # slow sockets the server closed (timeout or eviction)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _connect(self) -> Optional[socket.socket]:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=5)
        except OSError:
            self.refused += 1
            return None
        sock.setblocking(False)
        return sock

    def start(self) -> Attack:
        for _ in range(self.idle):
            sock = self._connect()
            if sock is not None:
                self.sockets.append(sock)
        for _ in range(self.slow):
            sock = self._connect()
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.send(SLOW_HEAD)
            self.sockets.append(sock)
            self.slow_sockets.append(sock)
        for _ in range(self.readers):
            try:
                sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(5)
                sock.connect((self.host, self.port))
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            except OSError:
                self.refused += 1
                continue
            self.sockets.append(sock)
        self._thread = threading.Thread(target=self._trickle, name="attack-trickle", daemon=True)
        self._thread.start()
        return self

    def _trickle(self) -> None:
        """One more header byte per slow socket every trickle_interval, until stopped."""
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.wait(self.trickle_interval):
            if time.monotonic() > deadline:
                break
            for sock in list(self.slow_sockets):
                try:
                    sock.send(b"x")
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self.closed_by_server += 1
                    self.slow_sockets.remove(sock)
        self._close_all()

    def _close_all(self) -> None:
        for sock in self.sockets:
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close_all()

    def __enter__(self) -> Attack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe(host: str, port: int, path: str = "/healthz", timeout: float = 10.0) -> tuple[int, float]:
    """(HTTP status, seconds) of one GET on a fresh connection; status 0 when it failed."""
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return 0, time.perf_counter() - start
    took = time.perf_counter() - start
    try:
        return int(data.split(b" ", 2)[1]), took
    except (IndexError, ValueError):
        return 0, took
