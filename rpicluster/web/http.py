"""The webserver role's HTTP server: stdlib ``ThreadingHTTPServer``, no framework.

Routes: ``/`` dashboard, ``/nodes/<id>`` node page, ``/api/nodes`` and
``/api/nodes/<id>`` JSON, ``/metrics`` Prometheus, ``/healthz`` probe. Every
response is rendered from the current :class:`~rpicluster.web.state.Snapshot`, so
requests never wait on the master. Unknown paths get 404; an unknown node id gets a
404 (JSON ``{"error": ...}`` under ``/api``). Only GET and HEAD are allowed.
"""

from __future__ import annotations

import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

import rpicluster
from rpicluster.web import api, dashboard
from rpicluster.web.metrics import MetricsRenderer
from rpicluster.web.state import ClusterState

log = logging.getLogger(__name__)

MAX_NODE_ID_LENGTH = 256
# The page embeds its CSS and SVGs and runs no script at all.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
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
        self, address: tuple[str, int], state: ClusterState, settings: DashboardSettings
    ) -> None:
        self.state = state
        self.settings = settings
        self.metrics = MetricsRenderer(lambda: state.snapshot, settings.stale_after)
        super().__init__(address, DashboardHandler)


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = f"rpicluster/{rpicluster.__version__}"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
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
        snap = self.server.state.snapshot
        cfg = self.server.settings
        stale = cfg.stale_after
        if path == "/":
            self._html(
                HTTPStatus.OK,
                dashboard.render_dashboard(
                    snap,
                    refresh_interval=cfg.refresh_interval,
                    history_window=cfg.history_window,
                    stale_after=stale,
                ),
            )
        elif path == "/healthz":
            self._json(HTTPStatus.OK, api.health_document(snap, stale))
        elif path == "/metrics":
            self._send(
                HTTPStatus.OK, self.server.metrics.render(), self.server.metrics.content_type
            )
        elif path in ("/api/nodes", "/api/nodes/"):
            self._json(HTTPStatus.OK, api.nodes_document(snap, stale))
        elif path.startswith(("/api/nodes/", "/nodes/")):
            node_id = _node_id(path)
            node = snap.node(node_id) if node_id is not None else None
            if node_id is None or node is None:
                shown = (node_id or path)[:80]
                self._not_found(path, f"no node with id {shown!r}")
            elif path.startswith("/api/"):
                self._json(HTTPStatus.OK, api.node_document(snap, node_id, stale))
            else:
                page = dashboard.render_node(
                    snap,
                    node,
                    refresh_interval=cfg.refresh_interval,
                    history_window=cfg.history_window,
                    stale_after=stale,
                )
                self._html(HTTPStatus.OK, page)
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
    if len(node_id) > MAX_NODE_ID_LENGTH or "/" in node_id:
        return None
    return node_id


class WebService:
    """Starts the server in a background thread and stops it; safe to stop twice."""

    def __init__(
        self, host: str, port: int, state: ClusterState, settings: DashboardSettings
    ) -> None:
        self.host = host
        self.port = port
        self.state = state
        self.settings = settings
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
            server = DashboardServer((self.host, self.port), self.state, self.settings)
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
