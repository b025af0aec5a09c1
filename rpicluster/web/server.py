"""The dashboard's HTTP event loop: one thread owns every socket, workers render.

:class:`DashboardServer` accepts, reads request heads, hands complete heads to a
bounded pool of rendering threads (:class:`~rpicluster.web.handler.DashboardHandler`
answers each into memory) and sends the responses, all non-blocking, so idle,
slow or numerous clients cannot exhaust it. Its bounds are constants below,
documented in the README's dashboard section and tested in
tests/test_web_under_load.py.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional

from rpicluster import displayable
from rpicluster.web import https
from rpicluster.web.handler import (
    MAX_HEAD_BYTES,
    DashboardHandler,
    DashboardSettings,
    plain_response,
)
from rpicluster.web.metrics import MetricsRenderer
from rpicluster.web.state import ClusterState, Snapshot

log = logging.getLogger(__name__)

# The server's bounds; see DashboardServer and the README's dashboard section.
MAX_CONNECTIONS = 256  # open client connections (systemd's default fd limit is 1,024)
HEADER_TIMEOUT = 10.0  # seconds for a complete request head (and keep-alive idle)
SEND_TIMEOUT = 10.0  # seconds for a response to leave
HANDSHAKE_TIMEOUT = 5.0  # seconds for a TLS handshake (HTTPS only), counted from accept
WORKERS = 4  # rendering threads
LISTEN_BACKLOG = 128  # a burst of browsers and scrapers must not see refused connections
SEND_CHUNK = 256 * 1024  # bytes handed to one send() call
REFUSE_DRAIN_BYTES = 256 * 1024  # unread input discarded before closing a refused request


class _Connection:
    """One client connection and where it is: reading a head, at a worker, or sending."""

    __slots__ = ("sock", "address", "buffer", "out", "deadline", "close_after", "handshaking")

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address = address
        self.buffer = b""  # bytes received and not yet part of a dispatched request
        self.out: list[memoryview] = []  # what is still to send: head, then body
        self.deadline = 0.0
        self.close_after = False
        self.handshaking = False  # HTTPS: the TLS handshake is not finished yet


class DashboardServer:
    """An event-loop HTTP server with a bounded pool of rendering threads.

    Why not ``ThreadingHTTPServer``: it gives every connection a thread that
    blocks reading the request, so 1,100 idle sockets meant 1,022 threads,
    175 MB and no answer to health probes. Here one thread (``serve_forever``)
    owns every socket, non-blocking: it reads request heads, and only a complete
    head goes to one of ``workers`` threads, which renders the response into
    memory; the loop then sends it. Idle and slow clients therefore cost a few
    KiB each and never a thread. The bounds (documented in the README's
    dashboard section, tested in tests/test_web_under_load.py):

    - ``max_connections`` open client connections (default 256, well below the
      1,024 file descriptors systemd allows by default). A new connection at the
      cap closes the connection that has waited longest for its request head
      (idle keep-alive or slowloris), so a fresh probe always gets in; when every
      connection is busy at a worker or sending, the new one is closed;
    - ``header_timeout`` seconds (default 10) for a complete request head,
      counted from the connection or the previous response (keep-alive idle);
    - ``send_timeout`` seconds (default 10) for a response to leave;
    - MAX_HEAD_BYTES (16 KiB) per request head (431 beyond), bodies are not read
      (a request announcing one is answered, then the connection is closed);
    - ``workers`` rendering threads (default 4); requests waiting for a worker are
      bounded by ``max_connections``, as a connection has one request in flight;
    - with ``ssl_context`` (HTTPS, web/https.py): ``handshake_timeout`` seconds
      (default 5) from accept to a finished TLS handshake, done by the loop, never
      by a worker; a connection still in its handshake is the first to make room
      at the cap. Plain HTTP to the port gets a plain 400 and is closed.
    """

    def __init__(
        self,
        address: tuple[str, int],
        state: ClusterState,
        settings: DashboardSettings,
        connected: Optional[Callable[[], bool]] = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        workers: int = WORKERS,
        ssl_context: Optional[ssl.SSLContext] = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        if (
            max_connections < 1
            or workers < 1
            or min(header_timeout, send_timeout, handshake_timeout) <= 0
        ):
            raise ValueError("max_connections, workers and the timeouts must be positive")
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.state = state
        self.settings = settings
        self.connected = connected
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.stats = {
            "connections_open": 0,
            "connections_max": max_connections,
            "connections_accepted_total": 0,
            "connections_evicted_total": 0,
            "connections_refused_total": 0,
            "request_timeouts_total": 0,
            "requests_total": 0,
        }
        if ssl_context is not None:
            self.stats["tls_handshake_failures_total"] = 0  # timeouts included
            self.stats["tls_plain_http_refused_total"] = 0
        self.metrics = MetricsRenderer(
            lambda: state.snapshot, settings.stale_after, lambda: dict(self.stats)
        )
        self._cache: dict[str, bytes] = {}
        self._cache_stamp: Any = None
        self._cache_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self.socket = listener
        self.server_address = listener.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        # Connections in their TLS handshake / waiting for a request head / sending
        # a response, oldest first: every entry of one dict has the same timeout,
        # so the first expires first.
        self._handshaking: dict[int, _Connection] = {}
        self._waiting: dict[int, _Connection] = {}
        self._sending: dict[int, _Connection] = {}
        self._busy = 0  # connections at a worker
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._accept_paused_until = 0.0
        self._last_accept_error = 0.0
        self._workers = [
            threading.Thread(target=self._work, name=f"dashboard-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    # ------------------------------------------------------------ rendering

    def cached(self, path: str, snap: Snapshot, render: Callable[[], bytes]) -> bytes:
        """``render()`` at most once per path, snapshot and second.

        Pages show ages in whole seconds ("12 s ago"), so within one second and one
        snapshot every viewer and scraper can share the same bytes; a burst of
        requests then costs one render.
        """
        stamp = (snap.version, int(time.time()))
        with self._cache_lock:
            if self._cache_stamp != stamp:
                self._cache, self._cache_stamp = {}, stamp
            body = self._cache.get(path)
        if body is None:
            body = render()
            with self._cache_lock:
                if self._cache_stamp == stamp and len(self._cache) < 256:
                    self._cache[path] = body
        return body

    def _work(self) -> None:
        """A worker: render the response to one complete request head at a time."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, head = job
            try:
                handler = DashboardHandler(head, conn.address, self)
                # The body is the page cache's own bytes object, not a copy: a
                # client that reads slowly holds a reference, never a megabyte.
                response = [handler.wfile.getvalue(), handler.response_body]
                close = handler.close_connection
            except Exception:  # noqa: BLE001 - a request must never kill a worker
                log.exception("error serving %s", displayable.text(conn.address))
                response, close = [plain_response(500, "internal error")], True
            self._done.put((conn, response, close))
            # A full wake pipe means the loop is awake anyway.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    # ------------------------------------------------------------ the loop

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the event loop until :meth:`shutdown` (in the thread that calls it)."""
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                timeout = poll_interval
                for table in (self._handshaking, self._waiting, self._sending):
                    if table:
                        first = next(iter(table.values()))
                        timeout = min(timeout, max(0.0, first.deadline - now))
                if self._accept_paused_until and self._accept_paused_until <= now:
                    self._resume_accepting()
                for key, mask in self._selector.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    elif key.data.handshaking:
                        self._handshake(key.data)
                    elif mask & selectors.EVENT_READ:
                        self._on_readable(key.data)
                    else:
                        self._on_writable(key.data)
                self._collect_done()
                self._expire(time.monotonic())
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait until it has returned."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket, every client connection and the workers."""
        for _ in self._workers:
            self._jobs.put(None)
        for conn in [*self._handshaking.values(), *self._waiting.values(), *self._sending.values()]:
            self._close(conn)
        self._selector.close()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()
        for worker in self._workers:
            worker.join(timeout=5)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # ------------------------------------------------------------ connections

    def _accept(self) -> None:
        for _ in range(64):  # a burst per loop turn, so requests in flight keep moving
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: back off instead of spinning
                self._pause_accepting(exc)
                return
            if self.stats["connections_open"] >= self.max_connections:
                idle = self._handshaking or self._waiting
                if idle:
                    oldest = next(iter(idle.values()))
                    self._close(oldest)
                    self.stats["connections_evicted_total"] += 1
                else:
                    sock.close()
                    self.stats["connections_refused_total"] += 1
                    continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, address)
            self.stats["connections_open"] += 1
            self.stats["connections_accepted_total"] += 1
            if self.ssl_context is None:
                self._wait_for_head(conn, register=True)
            else:
                conn.handshaking = True
                conn.deadline = time.monotonic() + self.handshake_timeout
                self._handshaking[sock.fileno()] = conn
                self._selector.register(sock, selectors.EVENT_READ, conn)

    def _pause_accepting(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_accept_error > 60:
            log.warning("dashboard: cannot accept connections (%s); pausing 0.5 s", exc)
            self._last_accept_error = now
        self._selector.unregister(self.socket)
        self._accept_paused_until = now + 0.5

    def _resume_accepting(self) -> None:
        self._accept_paused_until = 0.0
        self._selector.register(self.socket, selectors.EVENT_READ, None)

    def _wait_for_head(self, conn: _Connection, register: bool) -> None:
        conn.deadline = time.monotonic() + self.header_timeout
        self._waiting[conn.sock.fileno()] = conn
        if register:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        else:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        if conn.buffer:  # a pipelined request may already be complete
            self._try_dispatch(conn)
        pending = getattr(conn.sock, "pending", None)
        if pending is not None and conn.sock.fileno() in self._waiting and pending():
            self._on_readable(conn)  # decrypted bytes that select() cannot see

    def _handshake(self, conn: _Connection) -> None:
        """HTTPS: look at the first byte, wrap the socket, advance the TLS handshake."""
        assert self.ssl_context is not None
        if not isinstance(conn.sock, ssl.SSLSocket):
            try:
                first = conn.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if not first:
                self._close(conn)
                return
            if first[0] != https.TLS_HANDSHAKE_RECORD:
                self.stats["tls_plain_http_refused_total"] += 1
                self._refuse(conn, 400, https.PLAIN_HTTP_REASON)
                return
            self._selector.unregister(conn.sock)
            try:
                conn.sock = self.ssl_context.wrap_socket(
                    conn.sock, server_side=True, do_handshake_on_connect=False
                )
            except OSError:
                self._handshake_failed(conn, "cannot start TLS")
                return
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        try:
            wanted = https.handshake_step(conn.sock)  # type: ignore[arg-type]
        except OSError as exc:  # ssl.SSLError is an OSError
            self._handshake_failed(conn, https.failure_reason(exc))
            return
        if wanted:
            self._selector.modify(conn.sock, wanted, conn)
            return
        del self._handshaking[conn.sock.fileno()]
        conn.handshaking = False
        self._wait_for_head(conn, register=False)

    def _handshake_failed(self, conn: _Connection, reason: str) -> None:
        self.stats["tls_handshake_failures_total"] += 1
        log.debug(
            "dashboard: TLS handshake with %s failed: %s", displayable.text(conn.address), reason
        )
        self._close(conn)

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD_BYTES + 1 - len(conn.buffer))
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        self._try_dispatch(conn)

    def _try_dispatch(self, conn: _Connection) -> None:
        """Hand a complete request head to a worker; refuse one that is too long."""
        buffer = conn.buffer.lstrip(b"\r\n")  # stray line ends between requests
        found = [i for i in (buffer.find(b"\r\n\r\n"), buffer.find(b"\n\n")) if i >= 0]
        if not found:
            conn.buffer = buffer
            if len(buffer) > MAX_HEAD_BYTES:
                self._refuse(conn, 431, "request head too large")
            return
        first = min(found)
        end = first + (4 if buffer.startswith(b"\r\n\r\n", first) else 2)
        if end > MAX_HEAD_BYTES:
            self._refuse(conn, 431, "request head too large")
            return
        head, conn.buffer = buffer[:end], buffer[end:]
        del self._waiting[conn.sock.fileno()]
        self._selector.unregister(conn.sock)
        self._busy += 1
        self.stats["requests_total"] += 1
        self._jobs.put((conn, head))

    def _collect_done(self) -> None:
        while True:
            try:
                conn, response, close = self._done.get_nowait()
            except queue.Empty:
                return
            self._busy -= 1
            if conn.sock.fileno() < 0:  # closed by server_close meanwhile
                continue
            conn.out = [memoryview(part) for part in response if part]
            conn.close_after = close
            conn.deadline = time.monotonic() + self.send_timeout
            self._sending[conn.sock.fileno()] = conn
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._on_writable(conn)

    def _on_writable(self, conn: _Connection) -> None:
        out = conn.out
        try:
            while out:
                sent = conn.sock.send(out[0][:SEND_CHUNK])
                out[0] = out[0][sent:]
                if not out[0]:
                    out.pop(0)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            self._close(conn)
            return
        del self._sending[conn.sock.fileno()]
        if conn.close_after:
            self._close(conn)
        else:
            self._wait_for_head(conn, register=False)

    def _refuse(self, conn: _Connection, status: int, reason: str) -> None:
        """Answer a request we will not serve in one best-effort send, then close.

        What the client sent and we did not read is drained first (up to
        REFUSE_DRAIN_BYTES already received): closing a socket with unread input
        sends a reset, which could destroy the answer before the client reads it.
        """
        with contextlib.suppress(OSError):
            conn.sock.send(plain_response(status, reason))
            conn.sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < REFUSE_DRAIN_BYTES:
                chunk = conn.sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        self._close(conn)

    def _expire(self, now: float) -> None:
        for table in (self._handshaking, self._waiting, self._sending):
            while table:
                conn = next(iter(table.values()))
                if conn.deadline > now:
                    break
                if table is self._handshaking:
                    self._handshake_failed(conn, "not finished in time")
                    continue
                if table is self._waiting:
                    self.stats["request_timeouts_total"] += 1
                    if conn.buffer.strip():  # a request started and never finished
                        self._refuse(conn, 408, "request head not received in time")
                        continue
                self._close(conn)

    def _close(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        self._handshaking.pop(fd, None)
        self._waiting.pop(fd, None)
        self._sending.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        conn.buffer = b""
        conn.out = []
        self.stats["connections_open"] -= 1
