"""Alert delivery to an HTTP webhook, on a thread of its own.

The master's event loop must never wait for a receiver: a chat server that is
down or slow would otherwise stall every heartbeat. So :meth:`Webhook.put` only
appends to a bounded queue (never blocks, drops the oldest when full) and one
thread POSTs, with a timeout per request and retries with backoff. Standard
library only (``http.client``), as everything the master runs.

Bounds (docs/alerts.md): :data:`QUEUE_LIMIT` notifications waiting, each tried
:data:`ATTEMPTS` times with a delay doubling from :data:`RETRY_FIRST` to
:data:`RETRY_MAX` seconds, ``[alerts] webhook_timeout`` per request, at most
:data:`MAX_RESPONSE` bytes of the answer read. A receiver that fails is visible
in :meth:`Webhook.health` (the ``webhook`` object of the master dict).
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import threading
import time
import urllib.parse
from typing import Any, Optional

log = logging.getLogger("rpicluster.master.webhook")

QUEUE_LIMIT = 256  # notifications waiting at most; the oldest is dropped beyond
ATTEMPTS = 5  # tries per notification (the first and 4 retries), then it is given up
RETRY_FIRST = 1.0  # seconds before the first retry, doubling per retry
RETRY_MAX = 30.0  # seconds between two tries at most
MAX_RESPONSE = 64 * 1024  # bytes of a receiver's answer read at most
RECENT = 300.0  # seconds a drop or a given-up notification keeps the health not ok
USER_AGENT = "rpicluster-alerts"


def render(notification: dict[str, Any], fmt: str) -> tuple[bytes, dict[str, str]]:
    """The request body and headers of one notification in ``fmt`` (json, text, chat).

    ``text`` is a plain line ntfy (and most "POST a message" receivers) accept,
    with ntfy's title, priority and tags headers; ``chat`` is ``{"text": line}``,
    the incoming-webhook body of Slack, Mattermost, Rocket.Chat and Google Chat.
    """
    if fmt == "json":
        body = json.dumps(notification, separators=(",", ":"), allow_nan=False)
        return body.encode(), {"Content-Type": "application/json"}
    line = text_line(notification)
    if fmt == "chat":
        return json.dumps({"text": line}).encode(), {"Content-Type": "application/json"}
    critical = notification.get("severity") == "critical"
    firing = notification.get("status") == "firing"
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "Title": f"rpicluster {notification.get('status')}: {notification.get('alert')}",
        "Priority": "high" if critical and firing else "default",
        "Tags": "rotating_light" if firing else "white_check_mark",
    }
    return line.encode(), headers


def text_line(notification: dict[str, Any]) -> str:
    """``[FIRING] node_dead: node pi-3 is dead (...)``: one line for people."""
    status = str(notification.get("status", "")).upper()
    return f"[{status}] {notification.get('alert')}: {notification.get('summary')}"


class Webhook:
    """A bounded queue of notifications and the thread that POSTs them."""

    def __init__(self, url: str, fmt: str = "json", timeout: float = 5.0) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Shown in status and logs: no path, query or credentials (a token often lives there).
        self.target = f"{parts.scheme}://{self.host}" + (f":{self.port}" if self.port else "")
        self.fmt = fmt
        self.timeout = timeout
        self.retry_first = RETRY_FIRST  # tests shorten the backoff
        self._cond = threading.Condition()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.sent_total = 0
        self.failed_total = 0  # notifications given up after ATTEMPTS tries
        self.dropped_total = 0  # notifications dropped from a full queue (or at shutdown)
        self.attempts_total = 0
        self._error: Optional[str] = None  # the latest try's failure; None after a success
        self._lost_at: Optional[float] = None  # monotonic time of the latest drop or give-up
        self._last_ok: Optional[float] = None  # wall time of the latest delivery

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rpicluster-webhook", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop after the request in flight (if any); what still waits is counted dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            if self._queue:
                log.warning("%d alert notification(s) not sent at shutdown", len(self._queue))
                self.dropped_total += len(self._queue)
                self._queue.clear()

    def put(self, notification: dict[str, Any]) -> None:
        """Queue one notification; never blocks (the event loop calls it)."""
        with self._cond:
            self._queue.append(notification)
            if len(self._queue) > QUEUE_LIMIT:
                self._queue.popleft()
                self.dropped_total += 1
                self._lost_at = time.monotonic()
                if self.dropped_total == 1 or self.dropped_total % 100 == 0:
                    log.error("webhook queue full: %d notification(s) dropped", self.dropped_total)
            self._cond.notify()

    # ---------------------------------------------------------------- health

    def health(self) -> dict[str, Any]:
        """The ``webhook`` object of the master dict (docs/alerts.md)."""
        with self._cond:
            error = self._error
            lost = self._lost_at is not None and time.monotonic() - self._lost_at < RECENT
            if error is None and lost:
                error = f"notifications dropped or given up in the last {RECENT:g} s"
            alive = self._thread is not None and self._thread.is_alive()
            if error is None and not alive and not self._stopping:
                error = "the webhook sender is not running"
            return {
                "enabled": True,
                "ok": error is None,
                "error": error,
                "target": self.target,
                "format": self.fmt,
                "queue": len(self._queue),
                "queue_limit": QUEUE_LIMIT,
                "sent_total": self.sent_total,
                "failed_total": self.failed_total,
                "dropped_total": self.dropped_total,
                "attempts_total": self.attempts_total,
                "last_success_at": self._last_ok,
            }

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                notification = self._queue[0]
            try:
                delivered = self._deliver(notification)
            except Exception as exc:  # a bug or an unencodable value: the sender must live on
                log.error("webhook: notification not sendable, dropped: %r", exc)
                with self._cond:
                    self._error = f"notification not sendable: {exc!r}"[:200]
                delivered = False
            with self._cond:
                if self._queue and self._queue[0] is notification:
                    self._queue.popleft()
                if delivered:
                    self.sent_total += 1
                else:
                    self.failed_total += 1
                    self._lost_at = time.monotonic()

    def _deliver(self, notification: dict[str, Any]) -> bool:
        """Try up to ATTEMPTS times with backoff; False when given up (or stopping)."""
        body, headers = render(notification, self.fmt)
        headers["User-Agent"] = USER_AGENT
        delay = self.retry_first
        for attempt in range(1, ATTEMPTS + 1):
            error = self._post(body, headers)
            with self._cond:
                self.attempts_total += 1
                self._error = error
                if error is None:
                    self._last_ok = round(time.time(), 3)
                    return True
                if attempt == 1 or attempt == ATTEMPTS:
                    log.warning(
                        "webhook %s: %s (try %d of %d for %s %s)",
                        self.target,
                        error,
                        attempt,
                        ATTEMPTS,
                        notification.get("alert"),
                        notification.get("status"),
                    )
                if attempt == ATTEMPTS or self._cond.wait_for(lambda: self._stopping, delay):
                    return False
            delay = min(RETRY_MAX, delay * 2)
        return False

    def _post(self, body: bytes, headers: dict[str, str]) -> Optional[str]:
        """One POST; None on a 2xx answer, else what went wrong (one short line)."""
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read(MAX_RESPONSE)
            if 200 <= response.status < 300:
                return None
            return f"HTTP {response.status} {response.reason}"[:200]
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        finally:
            conn.close()


def disabled_health() -> dict[str, Any]:
    """The ``webhook`` object when no ``webhook_url`` is set: alerts are shown, not sent."""
    return {"enabled": False, "ok": True, "error": None}
