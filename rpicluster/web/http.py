"""The webserver role's HTTP service: stdlib only (selectors, a few threads), no framework.

:class:`WebService` starts and stops the server in a background thread. The work
is split by job: :mod:`rpicluster.web.server` is the event loop (connections,
bounds, rendering threads), :mod:`rpicluster.web.handler` answers one request
(routes, login, caching). The names below are re-exported for the callers that
import them from here.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Callable, Optional

from rpicluster.web.handler import DashboardHandler, DashboardSettings
from rpicluster.web.server import MAX_CONNECTIONS, DashboardServer
from rpicluster.web.state import ClusterState

__all__ = [
    "MAX_CONNECTIONS",
    "DashboardHandler",
    "DashboardServer",
    "DashboardSettings",
    "WebService",
]

log = logging.getLogger(__name__)


class WebService:
    """Starts the server in a background thread and stops it; safe to stop twice."""

    def __init__(
        self,
        host: str,
        port: int,
        state: ClusterState,
        settings: DashboardSettings,
        connected: Optional[Callable[[], bool]] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.host = host
        self.ssl_context = ssl_context  # HTTPS (web/https.py), or None for plain HTTP
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
                (self.host, self.port),
                self.state,
                self.settings,
                self.connected,
                ssl_context=self.ssl_context,
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
        scheme = "http" if self.ssl_context is None else "https"
        log.info("dashboard serving on %s://%s:%d/", scheme, host, port)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("dashboard stopped")
