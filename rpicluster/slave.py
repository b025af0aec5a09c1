"""``RpiBasicSlaveThread``: the base class of every slave role.

As in the article, a slave is a ``threading.Thread`` whose ``run()`` connects to
the master, sends the node's details, receives the master's info and then calls
``perform_action()`` over and over; a new kind of slave overrides
``perform_action()`` and nothing else. Everything a real fleet needs lives here
once, so every role gets it:

- reconnect forever with exponential backoff and full jitter (not a fixed 60 s);
- a *link* thread per connection that reads the master's frames and sends the
  heartbeats on their own schedule, so a slow ``perform_action()`` never makes the
  node look dead; it measures the heartbeat round trip and declares the master
  lost when nothing arrives for ``dead_after`` seconds;
- an exception in ``perform_action()`` is logged, counted and reported to the
  master (``action_error``), never fatal;
- ``stop()`` says ``goodbye`` (the master records ``left``, not ``dead``) and ends
  promptly, even in the middle of a backoff wait.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import protocol
from rpicluster.backoff import Backoff
from rpicluster.config import DEFAULT_STATE_DIR, Config, ConfigError, TlsSettings
from rpicluster.identity import IdentityError, load_or_create_node_id
from rpicluster.nodeinfo import node_details

if TYPE_CHECKING:  # ssl is imported only with [tls]: a lean slave never maps OpenSSL
    from rpicluster.tls import TlsSocket

logger = logging.getLogger(__name__)

MAX_ROLE_LENGTH = 200  # what the master accepts in hello (docs/protocol.md)

# One token per slave process, sent in every hello (docs/protocol.md section 4): all
# role threads of one rpicluster-slave share it, so the master tells this process
# reconnecting (same token: the newer connection replaces the older) from another
# machine using the same node id, a copied SD card (another token while this one
# is connected and heard from: refused with ``duplicate_id``).
INSTANCE = os.urandom(8).hex()
# Seconds a role waits after ``duplicate_id`` before trying again: the master keeps
# the id for the machine that holds it, so retrying sooner only fills both logs.
DUPLICATE_ID_BACKOFF = 60.0

# Messages a slave may send with send(); the handshake and queries have their own paths.
_SENDABLE = (protocol.VITALS, protocol.ACTION_ERROR, protocol.GOODBYE, protocol.HEARTBEAT)


class NotConnectedError(ConnectionError):
    """The slave has no live connection to the master right now."""


class QueryError(Exception):
    """The master answered a query with ``ok: false``; ``str()`` is its error."""


class _Link:
    """One authenticated connection: its socket, heartbeats and pending queries.

    The link thread is the only reader of the socket; writers (heartbeats, the
    role's ``send()``, ``stop()``'s goodbye) share one lock so frames never mix.
    """

    def __init__(
        self, slave: RpiBasicSlaveThread, sock: Any, interval: float, dead_after: float
    ) -> None:
        self.slave = slave
        self.sock = sock
        self.interval = interval
        self.dead_after = dead_after
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self.close_reason = ""
        self.error_code: Optional[str] = None
        self.master_left = False  # the master said goodbye (a planned shutdown)
        self.pending: dict[int, list[Any]] = {}  # query id -> [Event, reply]
        self.pending_lock = threading.Lock()
        self.sent_at: dict[int, float] = {}  # heartbeat seq -> monotonic send time
        self.last_heard = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"{slave.name}-link", daemon=True)

    # ------------------------------------------------------------------ writing

    def send(self, frame: bytes) -> None:
        if self.closed.is_set():
            raise NotConnectedError("not connected to the master")
        with self.send_lock:
            try:
                protocol.send_frame(self.sock, frame)
            except (protocol.DisconnectionError, socket.timeout) as exc:
                self.close(f"send failed: {exc}")
                raise NotConnectedError(f"connection to the master lost: {exc}") from None

    def close(self, reason: str) -> None:
        """End the link (idempotent); wakes the link thread and every waiter."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self.pending_lock:
            for slot in self.pending.values():
                slot[0].set()
        self.slave._interrupt.set()

    # ------------------------------------------------------------------ reading

    def _run(self) -> None:
        slave = self.slave
        decoder = protocol.FrameDecoder(slave.max_frame_size)
        seq = itertools.count(1)
        next_beat = time.monotonic()
        try:
            while not self.closed.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(next(seq))
                    next_beat = max(next_beat + self.interval, now)
                if now - self.last_heard > self.dead_after:
                    self.close(f"no word from the master for {now - self.last_heard:.1f} s")
                    break
                timeout = min(next_beat, self.last_heard + self.dead_after) - now
                # TLS may hold decrypted bytes already; select() sees only the socket.
                pending = getattr(self.sock, "pending", None)
                if pending is not None and pending():
                    readable = [self.sock]
                else:
                    readable, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
                if not readable:
                    continue
                try:
                    data = self.sock.recv(65536)
                except (OSError, socket.timeout) as exc:
                    self.close(f"connection lost: {exc}")
                    break
                if not data:
                    self.close("connection closed by the master")
                    break
                self.last_heard = time.monotonic()
                for body in decoder.feed(data):
                    self._dispatch(protocol.decode_body(body))
        except protocol.ProtocolError as exc:
            self.close(f"master sent a bad frame ({exc.code}): {exc.message}")
        except NotConnectedError:
            pass
        except (OSError, ValueError) as exc:  # select on a socket closed under us
            self.close(f"connection lost: {exc}")
        finally:
            self.close(self.close_reason or "link ended")
            with contextlib.suppress(OSError):
                self.sock.close()

    def _heartbeat(self, seq: int) -> None:
        self.sent_at[seq] = time.monotonic()
        if len(self.sent_at) > 64:  # acks that never came: forget the oldest
            del self.sent_at[min(self.sent_at)]
        self.send(protocol.make(protocol.HEARTBEAT, seq=seq, sent_at=time.time()))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == protocol.HEARTBEAT_ACK:
            sent = self.sent_at.pop(message["seq"], None)
            if sent is not None:
                self.slave.last_rtt = time.monotonic() - sent
        elif kind == protocol.REPLY:
            with self.pending_lock:
                slot = self.pending.get(message["id"])
            if slot is not None:
                slot[1] = message
                slot[0].set()
        elif kind == protocol.ERROR:
            self.error_code = message["code"]
            logger.error("master reports error %s: %s", message["code"], message["message"][:200])
            if message["code"] in (protocol.E_REPLACED, protocol.E_AUTH_FAILED):
                self.close(f"master closed the connection ({message['code']})")
        elif kind == protocol.REFUSED:
            # One message was refused (a limit of docs/protocol.md); the link stays up.
            logger.warning(
                "master refused %d message(s): %s: %s",
                message["count"],
                message["code"],
                message["message"][:200],
            )
        elif kind == protocol.GOODBYE:
            self.master_left = True
            self.close(f"master said goodbye: {message['reason'][:200]}")
        else:
            logger.debug("ignoring %s message from the master", kind)


class RpiBasicSlaveThread(threading.Thread):
    """The ``basic`` role: joins the cluster and heartbeats; subclasses add work.

    Override :meth:`perform_action`; it is called over and over while connected.
    Helpers for subclasses: :attr:`node_id`, :attr:`master_info`, :attr:`config`,
    :meth:`send`, :meth:`request`, :meth:`wait`, :attr:`stopping`.
    """

    #: The role name sent to the master; a subclass that does not set it is
    #: named by its class path ``package.module:ClassName``.
    role: str = "basic"

    def __init__(
        self,
        master_ip: str,
        socket_port: int,
        *,
        secret: str,
        node_id: Optional[str] = None,
        state_dir: Optional[str] = None,
        config: Optional[Config] = None,
        heartbeat_interval: float = 1.0,
        dead_after: Optional[float] = None,
        reconnect_base: float = 1.0,
        reconnect_cap: float = 5.0,
        handshake_timeout: float = 5.0,
        max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
        name: Optional[str] = None,
        node_name: Optional[str] = None,
        groups: tuple[str, ...] = (),
        tls: Optional[TlsSettings] = None,
    ) -> None:
        if not secret:
            raise ValueError("secret is required (the [cluster] secret)")
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        role = self.role_name()
        if not (0 < len(role) <= MAX_ROLE_LENGTH and role.isprintable() and role == role.strip()):
            raise ValueError(
                f"{type(self).__name__}.role {role[:40]!r} must be 1..{MAX_ROLE_LENGTH}"
                " printable characters without surrounding spaces"
            )
        super().__init__(name=name or f"slave-{role}", daemon=True)
        self.server_address = (master_ip, int(socket_port))
        self.secret = secret
        # With [tls]: verify the master (cluster CA and its name) before the hello.
        self.tls = tls
        self.config = config
        if node_id is None:
            node_id = load_or_create_node_id(state_dir or DEFAULT_STATE_DIR)
        self.node_id: str = node_id
        # Sent with the details: the name the fleet knows this node by (else the
        # master shows the OS hostname) and its inventory groups.
        self.node_name = node_name or None
        self.groups = tuple(groups)
        self.instance = INSTANCE  # the process's token (a test may give a thread its own)
        self.heartbeat_interval = float(heartbeat_interval)
        self.dead_after = float(dead_after or max(5.0, 5 * self.heartbeat_interval))
        self.handshake_timeout = float(handshake_timeout)
        self.max_frame_size = int(max_frame_size)
        self.backoff = Backoff(reconnect_base, reconnect_cap)
        self.master_info: dict[str, Any] = {}
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.last_rtt: Optional[float] = None
        self.action_errors = 0
        self.connections = 0  # successful handshakes so far
        self._interrupt = threading.Event()
        self._link: Optional[_Link] = None
        self._query_ids = itertools.count(1)

    # ----------------------------------------------------------------- building

    @classmethod
    def role_name(cls) -> str:
        """The role this class registers as (its own ``role``, else its class path)."""
        own = cls.__dict__.get("role")
        return own if isinstance(own, str) and own else f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def from_config(cls, config: Config) -> RpiBasicSlaveThread:
        """Build the role thread from a validated config with a ``[slave]`` section."""
        if config.slave is None:
            raise ConfigError(config.path, "slave", None, "section is missing")
        cluster, slave = config.cluster, config.slave
        try:
            node_id = load_or_create_node_id(slave.state_dir)
        except IdentityError as exc:
            raise ConfigError(config.path, "slave", "state_dir", str(exc)) from None
        return cls(
            slave.master_ip,
            slave.socket_port,
            secret=cluster.secret,
            node_id=node_id,
            config=config,
            heartbeat_interval=cluster.heartbeat_interval,
            dead_after=cluster.dead_after,
            reconnect_base=slave.reconnect_base,
            reconnect_cap=slave.reconnect_cap,
            handshake_timeout=cluster.handshake_timeout,
            max_frame_size=cluster.max_frame_size,
            node_name=slave.node_name,
            groups=slave.groups,
            tls=config.tls,
        )

    def details(self) -> dict[str, Any]:
        """What the hello carries: the machine's facts, the node name and groups."""
        details = dict(node_details())
        if self.node_name:
            details["node_name"] = self.node_name
        details["groups"] = list(self.groups)
        return details

    # ------------------------------------------------------------ subclass API

    def perform_action(self) -> None:
        """One unit of the role's work; the base role only idles (heartbeats run apart)."""
        self.wait(None)

    def wait(self, seconds: Optional[float]) -> bool:
        """Sleep up to ``seconds`` (None: until woken); True once :meth:`stop` was called.

        Also returns early (False) when the connection is lost, so the role gets
        back to ``run()`` and the thread reconnects at once.
        """
        self._interrupt.wait(seconds)
        return self.stopping.is_set()

    def send(self, msg_type: str, **fields: Any) -> None:
        """Send one message to the master; raises NotConnectedError when offline."""
        if msg_type not in _SENDABLE:
            raise ValueError(
                f"send() cannot send {msg_type!r} (one of: {', '.join(_SENDABLE)});"
                " use request() for queries"
            )
        link = self._link
        if link is None:
            raise NotConnectedError("not connected to the master")
        link.send(protocol.make(msg_type, **fields))

    def request(self, what: str, timeout: float = 5.0, **fields: Any) -> Any:
        """Ask the master a ``query`` and return the reply's ``data``.

        Raises :class:`QueryError` when the master answers with an error,
        :class:`TimeoutError` when no reply comes within ``timeout`` seconds and
        :class:`NotConnectedError` when the connection is down or lost meanwhile.
        """
        link = self._link
        if link is None:
            raise NotConnectedError("not connected to the master")
        query_id = next(self._query_ids)
        slot: list[Any] = [threading.Event(), None]
        with link.pending_lock:
            link.pending[query_id] = slot
        try:
            link.send(protocol.make(protocol.QUERY, id=query_id, what=what, **fields))
            slot[0].wait(timeout)
        finally:
            with link.pending_lock:
                link.pending.pop(query_id, None)
        reply = slot[1]
        if reply is None:
            if link.closed.is_set():
                raise NotConnectedError(f"connection lost during query {what!r}")
            raise TimeoutError(f"master did not answer query {what!r} within {timeout:g} s")
        if not reply["ok"]:
            raise QueryError(str(reply.get("error", "query failed")))
        return reply.get("data")

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        """Say goodbye to the master and end the thread promptly (join() to wait)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._interrupt.set()
        link = self._link
        if link is not None and not link.closed.is_set():
            with contextlib.suppress(NotConnectedError):
                link.send(protocol.make(protocol.GOODBYE, reason="slave stopping"))
            link.close("slave stopping")

    def run(self) -> None:
        role = self.role_name()
        host, port = self.server_address
        logger.info("role %s of node %s starting; master at %s:%d", role, self.node_id, host, port)
        failures = _FailureLog()
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

    def _connect(self, failures: _FailureLog) -> Optional[_Link]:
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
        link = _Link(self, sock, interval, dead_after)
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

    def _tls(self, sock: socket.socket, failures: _FailureLog) -> Optional[TlsSocket]:
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

    def _serve(self, link: _Link) -> None:
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


class _FailureLog:
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
