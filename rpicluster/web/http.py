"""The webserver role's HTTP server: stdlib ``ThreadingHTTPServer``, no framework.

Routes: ``/`` dashboard, ``/nodes/<id>`` node page, ``/api/nodes`` and
``/api/nodes/<id>`` JSON, ``/metrics`` Prometheus, ``/healthz`` probe. Every
response is rendered from the current :class:`~rpicluster.web.state.Snapshot`, so
requests never wait on the master. Unknown paths get 404; an unknown node id gets a
404 (JSON ``{"error": ...}`` under ``/api``). Only GET and HEAD are allowed.
"""

from __future__ import annotations

import gzip
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlsplit

import rpicluster
from rpicluster.web import api, dashboard
from rpicluster.web.metrics import MetricsRenderer
from rpicluster.web.state import ClusterState, Snapshot

log = logging.getLogger(__name__)

MAX_NODE_ID_LENGTH = 256
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

    def __init__(self, refresh_interval: float, history_window: float, stale_after: float) -> None:
        self.refresh_interval = refresh_interval
        self.history_window = history_window
        self.stale_after = stale_after


class DashboardServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the cluster state it serves."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of browsers and scrapers must not see refused connections

    def __init__(
        self,
        address: tuple[str, int],
        state: ClusterState,
        settings: DashboardSettings,
        connected: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.state = state
        self.settings = settings
        self.connected = connected
        self.metrics = MetricsRenderer(lambda: state.snapshot, settings.stale_after)
        if ":" in address[0]:  # an IPv6 literal such as "::" or "::1"
            self.address_family = socket.AF_INET6
        self._cache: dict[str, bytes] = {}
        self._cache_stamp: Any = None
        self._cache_lock = threading.Lock()
        super().__init__(address, DashboardHandler)

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

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away is routine; anything else is logged once, with its cause."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s: %s", client_address, exc)
        else:
            log.error("error serving %s", client_address, exc_info=exc)


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = f"rpicluster/{rpicluster.__version__}"
    # Headers and body leave in one write, with no Nagle delay: without these a
    # kept-alive client waits ~40 ms for a delayed ACK on every request.
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        log.debug("%s %s", self.address_string(), format % args)

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
            self.wfile.write(body)

    def _html(self, status: int, text: str) -> None:
        self._send(status, text.encode("utf-8"), "text/html; charset=utf-8")

    def _json(self, status: int, doc: object) -> None:
        self._send(status, api.dumps(doc), "application/json")

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
            self._route(path)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client %s went away during %s", self.address_string(), path)
        except Exception:
            log.exception("error serving %s", path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain")

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
            self._json(HTTPStatus.OK, api.health_document(snap, stale))
        elif path == "/metrics":
            self._send_cached(path, snap, server.metrics.render, server.metrics.content_type)
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
        node_id = unquote(raw, errors="strict") if "%" in raw else raw
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
