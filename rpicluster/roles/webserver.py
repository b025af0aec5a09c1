"""The ``webserver`` role: a slave that serves the cluster's dashboard.

As in the article series, this is just a subclass of the base slave thread: its
``perform_action()`` asks the master for the cluster state every
``refresh_interval`` and keeps a copy (see :mod:`rpicluster.web.state`); an HTTP
server started with the thread serves the dashboard, the JSON API, ``/metrics``
and ``/healthz`` from that copy. When the master is unreachable the pages keep
showing the last known state, saying since when the master has not answered.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from rpicluster import protocol
from rpicluster.config import WebserverSettings
from rpicluster.slave import NotConnectedError, RpiBasicSlaveThread
from rpicluster.web import https
from rpicluster.web.auth import BasicAuth
from rpicluster.web.http import DashboardSettings, WebService
from rpicluster.web.state import ClusterState, refresh

log = logging.getLogger(__name__)


class WebserverSlaveThread(RpiBasicSlaveThread):
    """Refreshes a copy of the cluster state and serves it over HTTP.

    Keyword arguments override the ``[webserver]`` settings of ``config`` (tests
    use ``webserver_port=0`` for an ephemeral port; :attr:`web_address` tells it).
    """

    role = "webserver"
    #: Seconds between two attempts to bind a busy port.
    retry_bind_after = 10.0

    def __init__(
        self,
        *args: Any,
        webserver_host: Optional[str] = None,
        webserver_port: Optional[int] = None,
        refresh_interval: Optional[float] = None,
        history_window: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        settings = self.config.webserver if self.config is not None else WebserverSettings()
        self.webserver_host = settings.webserver_host if webserver_host is None else webserver_host
        port = settings.webserver_port if webserver_port is None else int(webserver_port)
        if not 0 <= port <= 65535:
            raise ValueError(f"webserver_port must be 0-65535, got {port}")
        interval = settings.refresh_interval if refresh_interval is None else refresh_interval
        window = settings.history_window if history_window is None else history_window
        if not interval > 0:
            raise ValueError(f"refresh_interval must be positive, got {interval}")
        if not window > 0:
            raise ValueError(f"history_window must be positive, got {window}")
        self.refresh_interval = float(interval)
        self.state = ClusterState(window)
        # A refresh that has not succeeded for this long means the master is unreachable,
        # even when no query failed (the connection may be down while we reconnect).
        stale_after = 3 * self.refresh_interval + self.dead_after + 5.0
        self.web = WebService(
            self.webserver_host,
            port,
            self.state,
            DashboardSettings(
                self.refresh_interval,
                float(window),
                stale_after,
                BasicAuth(settings.login_user, settings.login_password_hash)
                if settings.login_user
                else None,
            ),
            connected=self.connected.is_set,
            ssl_context=https.server_context(settings.https_cert_file, settings.https_key_file)
            if settings.https
            else None,
        )
        self._web_lock = threading.Lock()
        self._bind_failed_at: Optional[float] = None

    @property
    def web_address(self) -> tuple[str, int]:
        """(host, port) the dashboard is bound to; RuntimeError before it serves."""
        return self.web.address

    # ------------------------------------------------------------- the server

    def _ensure_serving(self) -> None:
        """Start the HTTP server if it is not running (a busy port is retried later)."""
        with self._web_lock:
            if self.web.server is not None or self.stopping.is_set():
                return
            now = time.monotonic()
            failed_at = self._bind_failed_at
            if failed_at is not None and now - failed_at < self.retry_bind_after:
                return
            try:
                self.web.start()
                self._bind_failed_at = None
            except OSError as exc:
                if self._bind_failed_at is None:
                    log.error("%s; retrying every %g s", exc, self.retry_bind_after)
                self._bind_failed_at = now

    def run(self) -> None:
        self._ensure_serving()  # serve (a "waiting for the master" page) before joining
        try:
            super().run()
        finally:
            self._stop_serving()

    def stop(self) -> None:
        super().stop()
        self._stop_serving()

    def _stop_serving(self) -> None:
        with self._web_lock:
            self.web.stop()

    # ----------------------------------------------------------------- action

    def perform_action(self) -> None:
        self._ensure_serving()
        started = time.monotonic()
        try:
            refresh(self.state, self.request)
        except (NotConnectedError, protocol.DisconnectionError, TimeoutError) as exc:
            self.state.mark_unreachable(str(exc))
            raise
        elapsed = time.monotonic() - started
        if self.wait(max(self.refresh_interval - elapsed, 0.0)):
            return
        if time.monotonic() - started < self.refresh_interval * 0.99:
            # wait() returned early without stop(): the connection to the master was lost.
            self.state.mark_unreachable("connection to the master lost")
