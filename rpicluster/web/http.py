"""The webserver role's HTTP server: stdlib only (selectors, a few threads), no framework.

Routes: ``/`` dashboard, ``/nodes/<id>`` node page, ``/api/nodes`` and
``/api/nodes/<id>`` JSON, ``/metrics`` Prometheus, ``/healthz`` probe. Every
response is rendered from the current :class:`~rpicluster.web.state.Snapshot`, so
requests never wait on the master. Unknown paths get 404; an unknown node id gets a
404 (JSON ``{"error": ...}`` under ``/api``), as is a malformed one. Only GET
and HEAD are allowed. ``/healthz`` answers 503 when the master says its store does
not save. Idle, slow or numerous clients cannot exhaust the server: see
:class:`DashboardServer` for its bounds.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import queue
import selectors
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import rpicluster
from rpicluster import displayable
from rpicluster.web import api, dashboard, sd
from rpicluster.web.auth import BasicAuth
from rpicluster.web.metrics import MetricsRenderer
from rpicluster.web.state import ClusterState, Snapshot

log = logging.getLogger(__name__)

MAX_NODE_ID_LENGTH = 256
# The server's bounds; see DashboardServer and the README's dashboard section.
MAX_CONNECTIONS = 256  # open client connections (systemd's default fd limit is 1,024)
HEADER_TIMEOUT = 10.0  # seconds for a complete request head (and keep-alive idle)
SEND_TIMEOUT = 10.0  # seconds for a response to leave
MAX_HEAD_BYTES = 16 * 1024  # request line and headers
WORKERS = 4  # rendering threads
LISTEN_BACKLOG = 128  # a burst of browsers and scrapers must not see refused connections
SEND_CHUNK = 256 * 1024  # bytes handed to one send() call
REFUSE_DRAIN_BYTES = 256 * 1024  # unread input discarded before closing a refused request
GZIP_MIN_BYTES = 4096  # smaller bodies are not worth compressing
# The page embeds its CSS and SVGs; the one script allowed is the reload poller, by hash.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
    f"script-src '{dashboard.RELOAD_SCRIPT_HASH}'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class DashboardSettings:
    """What the pages need to know besides the state (from ``[webserver]`` and ``[cluster]``)."""

    def __init__(
        self,
        refresh_interval: float,
        history_window: float,
        stale_after: float,
        auth: Optional[BasicAuth] = None,
    ) -> None:
        self.refresh_interval = refresh_interval
        self.history_window = history_window
        self.stale_after = stale_after
        self.auth = auth  # a login for every page but /healthz (web/auth.py), or None


class _Connection:
    """One client connection and where it is: reading a head, at a worker, or sending."""

    __slots__ = ("sock", "address", "buffer", "out", "deadline", "close_after")

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address = address
        self.buffer = b""  # bytes received and not yet part of a dispatched request
        self.out: list[memoryview] = []  # what is still to send: head, then body
        self.deadline = 0.0
        self.close_after = False


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
      bounded by ``max_connections``, as a connection has one request in flight.
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
    ) -> None:
        if max_connections < 1 or workers < 1 or header_timeout <= 0 or send_timeout <= 0:
            raise ValueError("max_connections, workers and the timeouts must be positive")
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
        # Connections waiting for a request head / sending a response, oldest first:
        # every entry of one dict has the same timeout, so the first expires first.
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
                response, close = [_plain_response(500, "internal error")], True
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
                for table in (self._waiting, self._sending):
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
        for conn in [*self._waiting.values(), *self._sending.values()]:
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
                if self._waiting:
                    oldest = next(iter(self._waiting.values()))
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
            self._wait_for_head(conn, register=True)

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

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD_BYTES + 1 - len(conn.buffer))
        except (BlockingIOError, InterruptedError):
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
        except (BlockingIOError, InterruptedError):
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
            conn.sock.send(_plain_response(status, reason))
            conn.sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < REFUSE_DRAIN_BYTES:
                chunk = conn.sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        self._close(conn)

    def _expire(self, now: float) -> None:
        for table in (self._waiting, self._sending):
            while table:
                conn = next(iter(table.values()))
                if conn.deadline > now:
                    break
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
        self._waiting.pop(fd, None)
        self._sending.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        conn.buffer = b""
        conn.out = []
        self.stats["connections_open"] -= 1


def _plain_response(status: int, reason: str) -> bytes:
    """A complete short text/plain response that closes the connection."""
    body = (reason + "\n").encode("ascii")
    phrase = HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


class DashboardHandler(BaseHTTPRequestHandler):
    """Answers one complete request head (bytes), writing the response to memory.

    The stdlib's request parsing (request line, headers, HTTP versions, error
    replies) is reused as is; the socket stays with :class:`DashboardServer`'s
    loop, which sends ``wfile``'s bytes and decides about keep-alive from
    ``close_connection``.
    """

    server: DashboardServer  # type: ignore[assignment]
    server_version = f"rpicluster/{rpicluster.__version__}"
    sys_version = ""
    response_body = b""  # a 200's body, kept apart from the head (see _send)
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------- plumbing

    def setup(self) -> None:
        self.rfile = io.BytesIO(self.request)
        self.wfile = io.BytesIO()

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        # A body we do not read would be taken for the next request: close instead.
        headers = getattr(self, "headers", None)
        if headers is not None and (
            headers.get("Transfer-Encoding") or headers.get("Content-Length", "0").strip() != "0"
        ):
            self.close_connection = True

    def finish(self) -> None:
        pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        log.debug("%s %s", self.address_string(), displayable.text(format % args))

    def _accepts_gzip(self) -> bool:
        for item in self.headers.get("Accept-Encoding", "").split(","):
            name, _, params = item.strip().partition(";")
            if name.strip().lower() == "gzip":
                return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00")
        return False

    def _send_cached(
        self, key: str, snap: Snapshot, render: Callable[[], bytes], content_type: str
    ) -> None:
        """A 200 from the per-second cache, gzipped (once) for clients that take it.

        The dashboard of 100 nodes is ~0.5 MB of SVG; gzip level 1 makes it ~10x
        smaller for the Pi's Wi-Fi at a few milliseconds of CPU, paid once per render.
        """
        server = self.server
        body = server.cached(key, snap, render)
        encoding = None
        if len(body) >= GZIP_MIN_BYTES and self._accepts_gzip():
            body = server.cached(key + "\0gzip", snap, lambda: gzip.compress(body, 1))
            encoding = "gzip"
        self._send(HTTPStatus.OK, body, content_type, encoding)

    def _send(
        self, status: int, body: bytes, content_type: str, encoding: Optional[str] = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Accept-Encoding")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.response_body = body  # sent after the head by the server's loop

    def _html(self, status: int, text: str) -> None:
        self._send(status, text.encode("utf-8"), "text/html; charset=utf-8")

    def _json(self, status: int, doc: object) -> None:
        self._send(status, api.dumps(doc), "application/json")

    def _http_sd(self, snap: Snapshot) -> None:
        """Prometheus HTTP service discovery (web/sd.py); ``?port=N`` for the targets' port."""
        query = parse_qs(urlsplit(self.path).query)
        raw = query.get("port", [str(sd.DEFAULT_PORT)])[-1]
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "port must be 1..65535"})
            return
        port = int(raw)
        render = lambda: api.dumps(sd.targets_document(snap, port))  # noqa: E731
        if port == sd.DEFAULT_PORT:  # cached for the usual request only: the cache stays small
            self._send_cached("/api/http_sd", snap, render, "application/json")
        else:
            self._send(HTTPStatus.OK, render(), "application/json")

    def _not_found(self, path: str, what: str) -> None:
        if path.startswith("/api/"):
            self._json(HTTPStatus.NOT_FOUND, {"error": what})
        else:
            self._html(HTTPStatus.NOT_FOUND, dashboard.render_not_found(what))

    # --------------------------------------------------------------- routes

    def do_HEAD(self) -> None:  # noqa: N802 (stdlib naming)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        path = urlsplit(self.path).path
        try:
            if not self._logged_in(path):
                return
            self._route(path)
        except Exception:
            log.exception("error serving %s", displayable.text(path))
            self.wfile = io.BytesIO()  # drop whatever was written before the error
            self.response_body = b""
            self.close_connection = True
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain")

    def _logged_in(self, path: str) -> bool:
        """With a login set: True for a good Authorization header (or /healthz), else a 401."""
        auth = self.server.settings.auth
        if auth is None or path == "/healthz":
            return True
        verdict = auth.check(self.headers.get("Authorization"))
        if verdict:
            return True
        status = HTTPStatus.TOO_MANY_REQUESTS if verdict is None else HTTPStatus.UNAUTHORIZED
        body = (
            b"too many failed logins, try again in a few seconds\n"
            if verdict is None
            else (b"login required\n")
        )
        if verdict is False and self.headers.get("Authorization"):
            log.warning("dashboard: failed login from %s", self.address_string())
        self.send_response(status)
        if verdict is False:
            self.send_header("WWW-Authenticate", 'Basic realm="rpicluster", charset="UTF-8"')
        else:
            self.send_header("Retry-After", "2")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.response_body = body
        return False

    def _method_not_allowed(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

    def _route(self, path: str) -> None:
        server = self.server
        snap = server.state.snapshot
        if (
            server.connected is not None
            and snap.fetched_at is not None
            and snap.unreachable_since is None
            and not server.connected()
        ):
            # The role lost its connection between two refreshes: say so at once
            # rather than after the staleness timeout.
            server.state.mark_unreachable("not connected to the master")
            snap = server.state.snapshot
        cfg = server.settings
        stale = cfg.stale_after
        html, json_type = "text/html; charset=utf-8", "application/json"
        if path == "/":
            self._send_cached(
                path,
                snap,
                lambda: dashboard.render_dashboard(
                    snap,
                    refresh_interval=cfg.refresh_interval,
                    history_window=cfg.history_window,
                    stale_after=stale,
                ).encode("utf-8"),
                html,
            )
        elif path in ("/favicon.svg", "/favicon.ico"):
            self._send(HTTPStatus.OK, dashboard.FAVICON_SVG.encode(), "image/svg+xml")
        elif path == "/healthz":
            doc = api.health_document(snap, stale)
            ok = HTTPStatus.OK if doc["store_ok"] else HTTPStatus.SERVICE_UNAVAILABLE
            self._json(ok, doc)
        elif path == "/metrics":
            self._send_cached(path, snap, server.metrics.render, server.metrics.content_type)
        elif path == "/api/http_sd":
            self._http_sd(snap)
        elif path in ("/api/nodes", "/api/nodes/"):
            self._send_cached(
                "/api/nodes", snap, lambda: api.dumps(api.nodes_document(snap, stale)), json_type
            )
        elif path.startswith(("/api/nodes/", "/nodes/")):
            node_id = _node_id(path)
            node = snap.node(node_id) if node_id is not None else None
            if node_id is None or node is None:
                shown = (node_id or path)[:80]
                self._not_found(path, f"no node with id {shown!r}")
            elif path.startswith("/api/"):
                self._send_cached(
                    path,
                    snap,
                    lambda: api.dumps(api.node_document(snap, node_id, stale)),
                    json_type,
                )
            else:
                self._send_cached(
                    path,
                    snap,
                    lambda: dashboard.render_node(
                        snap,
                        node,
                        refresh_interval=cfg.refresh_interval,
                        history_window=cfg.history_window,
                        stale_after=stale,
                    ).encode("utf-8"),
                    html,
                )
        else:
            self._not_found(path, f"no page at {path[:80]!r}")


def _node_id(path: str) -> Optional[str]:
    """The node id in ``/nodes/<id>`` or ``/api/nodes/<id>``, or None when malformed."""
    raw = path.split("/nodes/", 1)[1]
    if not raw or "/" in raw:
        return None
    try:
        node_id = unquote(raw, errors="surrogatepass") if "%" in raw else raw
    except UnicodeDecodeError:
        return None
    if len(node_id) > MAX_NODE_ID_LENGTH:
        return None
    return node_id


class WebService:
    """Starts the server in a background thread and stops it; safe to stop twice."""

    def __init__(
        self,
        host: str,
        port: int,
        state: ClusterState,
        settings: DashboardSettings,
        connected: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.host = host
        self.port = port
        self.state = state
        self.settings = settings
        self.connected = connected  # is the role connected to the master now?
        self.server: Optional[DashboardServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> tuple[str, int]:
        if self.server is None:
            raise RuntimeError("web service is not running")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve; OSError (port in use, bad address) says which address failed."""
        if self.server is not None:
            return
        try:
            server = DashboardServer(
                (self.host, self.port), self.state, self.settings, self.connected
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve the dashboard on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="dashboard-http",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        log.info("dashboard serving on http://%s:%d/", host, port)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("dashboard stopped")
