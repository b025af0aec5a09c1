"""Answers one dashboard request: routes, login, caching headers, the pages' bytes.

Routes: ``/`` dashboard, ``/nodes/<id>`` node page, ``/api/nodes`` and
``/api/nodes/<id>`` JSON, ``/api/http_sd``, ``/metrics`` Prometheus, ``/healthz``
probe. Every response is rendered from the current
:class:`~rpicluster.web.state.Snapshot`, so requests never wait on the master.
Unknown paths get 404; an unknown node id gets a 404 (JSON ``{"error": ...}``
under ``/api``), as is a malformed one. Only GET and HEAD are allowed.
``/healthz`` answers 503 when the master says its store does not save. The
socket is never seen here: :mod:`rpicluster.web.server`'s loop reads the head
and sends what the handler wrote to memory.
"""

from __future__ import annotations

import gzip
import io
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import rpicluster
from rpicluster import displayable
from rpicluster.web import api, dashboard, sd
from rpicluster.web.auth import BasicAuth
from rpicluster.web.state import Snapshot

if TYPE_CHECKING:
    from rpicluster.web.server import DashboardServer

log = logging.getLogger(__name__)

MAX_NODE_ID_LENGTH = 256
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (the loop refuses longer: 431)
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


def plain_response(status: int, reason: str) -> bytes:
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
