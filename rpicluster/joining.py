"""How a role thread joins the master and stays joined: the reconnection loop.

Split from ``slave.py`` so the role's public API stays as small as the article's
while the hard part lives in one place: connect (with ``[tls]``, the master
proves it is the master before a byte of the protocol is sent), the HMAC
handshake, the master's timing, reconnecting forever with backoff and full
jitter (slower after ``duplicate_id``, ``replaced`` or a master that said
goodbye), calling ``perform_action()`` while the link lives, and logging each
reason for not joining loudly once and then quietly. ``Joining`` is a mixin of
``RpiBasicSlaveThread``: its ``run()`` is the thread's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import protocol
from rpicluster.backoff import Backoff
from rpicluster.link import Link, NotConnectedError

if TYPE_CHECKING:  # ssl is imported only with [tls]: a lean slave never maps OpenSSL
    from rpicluster.config import TlsSettings
    from rpicluster.tls import TlsSocket

# The slave's one logger (as before the split): journal filters and tests name it.
logger = logging.getLogger("rpicluster.slave")

# Seconds a role waits after ``duplicate_id`` before trying again: the master keeps
# the id for the machine that holds it, so retrying sooner only fills both logs.
DUPLICATE_ID_BACKOFF = 60.0


class Joining:
    """The join-and-rejoin loop of ``RpiBasicSlaveThread`` (a mixin: the attributes
    below are the role thread's, set by its ``__init__``)."""

    server_address: tuple[str, int]
    secret: str
    tls: Optional[TlsSettings]
    node_id: str
    instance: str
    heartbeat_interval: float
    dead_after: float
    max_frame_size: int
    backoff: Backoff
    master_info: dict[str, Any]
    stopping: threading.Event
    connected: threading.Event
    action_errors: int
    connections: int
    _interrupt: threading.Event
    _link: Optional[Link]

    if TYPE_CHECKING:  # the role thread's own methods, called from the loop

        def role_name(self) -> str: ...
        def details(self) -> dict[str, Any]: ...
        def perform_action(self) -> None: ...
        def wait(self, seconds: Optional[float]) -> bool: ...
        def send(self, msg_type: str, **fields: Any) -> None: ...

    def run(self) -> None:
        role = self.role_name()
        host, port = self.server_address
        logger.info("role %s of node %s starting; master at %s:%d", role, self.node_id, host, port)
        failures = FailureLog()
        while not self.stopping.is_set():
            link = self._connect(failures)
            if link is None:
                delay = self.backoff.next_delay()
                if failures.last == protocol.E_DUPLICATE_ID:
                    # Another machine holds our node id (a copied card): the master
                    # keeps it there, so ask again only now and then.
                    delay = max(delay, DUPLICATE_ID_BACKOFF)
                logger.debug("role %s retries in %.2f s", role, delay)
                self.stopping.wait(delay)
                continue
            failures.reset()
            self._serve(link)
            self._link = None
            self.connected.clear()
            if self.stopping.is_set():
                break
            logger.warning("role %s lost the master: %s; reconnecting", role, link.close_reason)
            if link.error_code == protocol.E_REPLACED:
                # Another process claims this node id and role: do not flap with it.
                self.stopping.wait(self.backoff.cap)
            else:
                if link.master_left:
                    self.backoff.spread_fully()
                self.stopping.wait(self.backoff.next_delay())
        logger.info("role %s of node %s stopped", role, self.node_id)

    def _connect(self, failures: FailureLog) -> Optional[Link]:
        """One attempt: TCP connect and handshake. Returns the running link or None."""
        role = self.role_name()
        host, port = self.server_address
        try:
            sock = socket.create_connection((host, port), timeout=self.handshake_timeout)
        except OSError as exc:
            failures.log("connect", f"cannot reach the master at {host}:{port}: {exc}")
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self._tls(sock, failures)
            if sock is None:
                return None
        try:
            welcome = protocol.client_handshake(
                sock,
                self.secret,
                kind=protocol.KIND_SLAVE,
                node_id=self.node_id,
                role=role,
                details=self.details(),
                max_frame_size=self.max_frame_size,
                instance=self.instance,
            )
        except protocol.ProtocolError as exc:
            sock.close()
            hints = {
                protocol.E_AUTH_FAILED: " (is [cluster] secret the same as the master's?)",
                protocol.E_DUPLICATE_ID: f"; retrying every {DUPLICATE_ID_BACKOFF:g} s",
            }
            failures.log(
                exc.code,
                f"master at {host}:{port} refused role {role}: {exc.code}: {exc.message}"
                + hints.get(exc.code, ""),
                level=logging.ERROR,
            )
            return None
        except (OSError, protocol.DisconnectionError) as exc:
            sock.close()
            refusal = self._tls_refusal(exc)
            if refusal:  # the master refused our certificate
                failures.log(
                    "tls", f"master at {host}:{port} refused role {role}: {refusal}", logging.ERROR
                )
            else:
                failures.log("handshake", f"handshake with {host}:{port} failed: {exc}")
            return None
        self.master_info = welcome.get("master", {})
        interval, dead_after = self._timing(self.master_info)
        # Writes block at most dead_after; reads are driven by select() in the link.
        sock.settimeout(dead_after)
        self.backoff.reset()
        self.connections += 1
        link = Link(self, sock, interval, dead_after)
        self._interrupt.clear()
        self._link = link
        if self.stopping.is_set():  # stop() raced with the handshake: leave properly
            with contextlib.suppress(NotConnectedError):
                link.send(protocol.make(protocol.GOODBYE, reason="slave stopping"))
            link.close("slave stopping")
        link.thread.start()
        self.connected.set()
        logger.info(
            "role %s joined master %s at %s:%d",
            role,
            self.master_info.get("hostname", "?"),
            host,
            port,
        )
        return link

    def _tls_refusal(self, exc: BaseException) -> str:
        """Why the master ended a TLS connection (its alert), or '' for other faults."""
        if self.tls is None:
            return ""
        import ssl

        from rpicluster.tls import explain

        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        return explain(cause) if isinstance(cause, ssl.SSLError) else ""

    def _tls(self, sock: socket.socket, failures: FailureLog) -> Optional[TlsSocket]:
        """TLS handshake: the master must prove it is the master before we send a byte.

        A master whose certificate is not of the cluster CA, or does not name the
        address we dialled, gets no hello: nothing of the protocol is sent.
        """
        import ssl

        from rpicluster import tls as tlsmod

        assert self.tls is not None
        host, port = self.server_address
        try:
            context = tlsmod.cached_client_context(self.tls)
            return tlsmod.connect(sock, context, self.tls.master_name or host)
        except ssl.SSLError as exc:
            failures.log(
                "tls",
                f"TLS with the master at {host}:{port} failed: {tlsmod.explain(exc)}; nothing sent",
                level=logging.ERROR,
            )
        except (OSError, tlsmod.TlsError) as exc:
            failures.log("tls-io", f"TLS with the master at {host}:{port} failed: {exc}")
        sock.close()
        return None

    def _timing(self, master: dict[str, Any]) -> tuple[float, float]:
        """Heartbeat interval and dead_after for this link: the master's, when it says.

        The master judges liveness with its own [cluster] settings, so a slave
        whose config disagrees follows the master's welcome rather than being
        marked suspect; the disagreement is logged once per connection.
        """
        interval, dead_after = self.heartbeat_interval, self.dead_after
        theirs = master.get("heartbeat_interval"), master.get("dead_after")
        if (
            all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0.01 <= v <= 3600
                for v in theirs
            )
            and theirs[1] > theirs[0]
        ):
            if (interval, dead_after) != theirs:
                logger.warning(
                    "role %s: [cluster] heartbeat_interval %g / dead_after %g differ from the"
                    " master's %g / %g; using the master's",
                    self.role_name(),
                    interval,
                    dead_after,
                    theirs[0],
                    theirs[1],
                )
            interval, dead_after = float(theirs[0]), float(theirs[1])
        return interval, dead_after

    def _serve(self, link: Link) -> None:
        """Call perform_action() over and over while the link lives."""
        pause = Backoff(0.1, max(1.0, self.backoff.cap))
        while not link.closed.is_set() and not self.stopping.is_set():
            try:
                self.perform_action()
            except (NotConnectedError, protocol.DisconnectionError):
                break
            except Exception as exc:  # a role's bug must never kill the loop
                self._report_action_error(exc, first=pause.attempt == 0)
                self.wait(pause.next_delay())
            else:
                pause.reset()
        link.thread.join(timeout=link.dead_after)

    def _report_action_error(self, exc: Exception, *, first: bool) -> None:
        self.action_errors += 1
        text = f"{type(exc).__name__}: {exc}"[:500]
        role = self.role_name()
        if first:
            logger.error("role %s: perform_action() failed: %s", role, text, exc_info=exc)
        else:
            logger.error(
                "role %s: perform_action() failed again (%d so far): %s",
                role,
                self.action_errors,
                text,
            )
        with contextlib.suppress(NotConnectedError):
            self.send(protocol.ACTION_ERROR, error=text, count=self.action_errors)


class FailureLog:
    """Log a failed attempt loudly the first time and when it changes, then quietly.

    A slave retrying every few seconds for hours must not fill the journal, but
    the reason it cannot join must be there, and again every minute.
    """

    REPEAT_AFTER = 60.0

    def __init__(self) -> None:
        self.kind: Optional[str] = None
        self.last: Optional[str] = None  # kind of the latest failure, logged or not
        self.logged_at = 0.0
        self.count = 0

    def log(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        self.count += 1
        self.last = kind
        now = time.monotonic()
        if kind != self.kind or now - self.logged_at >= self.REPEAT_AFTER:
            suffix = f" (attempt {self.count}; retrying)" if self.count > 1 else " (retrying)"
            logger.log(level, "%s%s", message, suffix)
            self.kind, self.logged_at = kind, now
        else:
            logger.debug("%s (attempt %d)", message, self.count)

    def reset(self) -> None:
        self.kind, self.last, self.count = None, None, 0
