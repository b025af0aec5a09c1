"""The master's own ``/metrics`` for Prometheus, on ``[master] metrics_port`` (off by default).

The dashboard's ``/metrics`` shows the fleet through one webserver Pi; this one
lets a Prometheus server watch the master itself, with or without a dashboard.
It runs in the master's event loop (the counters are read without locks) and is
as small as it can be, because every byte a stranger sends here is the master's
work: one ``GET`` per connection, the request head within :data:`HEAD_LIMIT`
bytes and :data:`HEAD_TIMEOUT` seconds, at most :data:`MAX_CONNECTIONS` open
(one more is closed at once), the answer flushed within :data:`SEND_TIMEOUT`
seconds, then the connection is closed. Standard library only: the text
exposition format 0.0.4, checked by ``promtool check metrics`` in the tests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from rpicluster.master.server import Master

log = logging.getLogger("rpicluster.master")

MAX_CONNECTIONS = 16  # open /metrics connections at most; one more is closed at once
HEAD_LIMIT = 8 * 1024  # bytes of request line and headers at most
HEAD_TIMEOUT = 5.0  # seconds to send the request head
SEND_TIMEOUT = 5.0  # seconds to take the answer before the connection is dropped
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_GAUGES = {"connections_open", "unauthenticated_open"}
_HELP = {
    "connections_total": "Connections accepted since the master started.",
    "connections_open": "Connections open now, of any kind.",
    "unauthenticated_open": "Connections open now that have not authenticated yet.",
    "messages_total": "Frames received from peers.",
    "accept_paused_total": "Pauses of accept(): pending table full, none stale (50 ms each).",
    "silent_deaths_total": "Nodes marked dead because they went silent.",
    "nodes_forgotten_total": "Nodes forgotten with their history (forget, forget_after).",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class _Text:
    """Builds an exposition: one HELP and TYPE per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{labels} {value:.17g}")

    def one(self, name: str, kind: str, doc: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            self.family(name, kind, doc, [("", number)])


def render(master: Master) -> bytes:
    """The exposition of the master's counters, node states, store, alerts and webhook."""
    info = master.master_dict()
    out = _Text()
    labels = f'{{version="{_escape(str(info["version"]))}",hostname="{_escape(master.hostname)}"}}'
    out.family("rpicluster_master_info", "gauge", "Constant 1, labelled.", [(labels, 1)])
    out.one("rpicluster_master_start_time_seconds", "gauge", "Start (epoch s).", info["started_at"])
    states = [(f'{{state="{state}"}}', n) for state, n in sorted(info["nodes"].items())]
    out.family("rpicluster_master_nodes", "gauge", "Known nodes per state.", states)
    for key, value in sorted(info["counters"].items()):
        doc = _HELP.get(key, f"The master's {key.replace('_', ' ')}.")
        kind = "gauge" if key in _GAUGES else "counter"
        out.one(f"rpicluster_master_{key}", kind, doc, value)
    store = info.get("store") or {}
    out.one("rpicluster_master_store_ok", "gauge", "1 while the store saves.", store.get("ok"))
    for key in ("queue", "queue_limit", "lag_seconds"):
        out.one(f"rpicluster_master_store_{key}", "gauge", f"Store {key}.", store.get(key))
    for key in ("dropped_total", "rejected_total", "write_errors_total"):
        out.one(f"rpicluster_master_store_{key}", "counter", f"Store {key}.", store.get(key))
    alerts = info.get("alerts") or {}
    firing = alerts.get("firing_count")
    out.one("rpicluster_master_alerts_firing", "gauge", "Alerts firing now.", firing)
    for key in ("fired_total", "resolved_total"):
        out.one(f"rpicluster_master_alerts_{key}", "counter", f"Alerts {key}.", alerts.get(key))
    hook = alerts.get("webhook") or {}
    if hook.get("enabled"):
        out.one("rpicluster_master_webhook_ok", "gauge", "1 while alerts deliver.", hook.get("ok"))
        out.one("rpicluster_master_webhook_queue", "gauge", "Waiting.", hook.get("queue"))
        for key in ("sent_total", "failed_total", "dropped_total", "attempts_total"):
            out.one(f"rpicluster_master_webhook_{key}", "counter", f"Webhook {key}.", hook.get(key))
    return ("\n".join(out.lines) + "\n").encode()


class MetricsProtocol(asyncio.Protocol):
    """One ``/metrics`` connection: read a head, answer, close."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.head = bytearray()
        self.timer: Optional[asyncio.TimerHandle] = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        if len(server.open) >= MAX_CONNECTIONS:
            server.refused_total += 1
            transport.abort()
            return
        server.open.add(self)
        self.timer = server.loop.call_later(HEAD_TIMEOUT, self._timeout)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.server.open.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def _timeout(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > HEAD_LIMIT:
                self._answer(431, b"request head too large\n", "text/plain")
            return
        line = bytes(self.head[: self.head.find(b"\r\n")]).split()
        if len(line) != 3 or not line[2].startswith(b"HTTP/"):
            self._answer(400, b"bad request\n", "text/plain")
        elif line[0] not in (b"GET", b"HEAD"):
            self._answer(405, b"only GET\n", "text/plain")
        elif line[1].split(b"?")[0] != b"/metrics":
            self._answer(404, b"see /metrics\n", "text/plain")
        else:
            self.server.requests_total += 1
            body = render(self.server.master)
            self._answer(200, body if line[0] == b"GET" else b"", CONTENT_TYPE, len(body))

    def _answer(self, status: int, body: bytes, ctype: str, length: Optional[int] = None) -> None:
        self.done = True
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Request Header Fields Too Large')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body) if length is None else length}"
            "\r\nConnection: close\r\n\r\n"
        )
        assert self.transport is not None
        self.transport.write(head.encode() + body)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.loop.call_later(SEND_TIMEOUT, self._timeout)
        self.transport.close()


class MetricsServer:
    """The listener of the master's ``/metrics``; started and stopped with the master."""

    def __init__(self, master: Master, host: str, port: int) -> None:
        self.master = master
        self.host = host
        self.port = port
        self.loop: asyncio.AbstractEventLoop = master.loop
        self.open: set[MetricsProtocol] = set()
        self.requests_total = 0
        self.refused_total = 0
        self._server: Optional[asyncio.base_events.Server] = None

    async def start(self) -> None:
        self._server = await self.loop.create_server(
            lambda: MetricsProtocol(self), self.host, self.port, backlog=64
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("master metrics on http://%s:%d/metrics", self.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.abort()
