"""The master's server: one asyncio event loop, one ``asyncio.Protocol`` per connection.

Callbacks instead of a coroutine per connection or per message keep a heartbeat
to a few tens of microseconds, which is what lets one Pi core serve 10,000
slaves. The loop runs in a background thread so the master can be embedded in
tests and in ``rpicluster-master`` alike; the registry is touched only from it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import signal
import socket
import threading
from typing import Any, Optional

from rpicluster import __version__
from rpicluster import protocol as p
from rpicluster.config import Config
from rpicluster.master.registry import DEAD, Registry, Session
from rpicluster.master.store import Store, read_history

log = logging.getLogger("rpicluster.master")

LISTEN_BACKLOG = 4096  # a whole fleet reconnecting at once after a master restart
FLUSH_INTERVAL = 0.5  # seconds between two batches of changed rows to the store
# Seconds between two batches of heartbeat times to the store. State changes are
# written within FLUSH_INTERVAL and every time is written at a clean stop, so this
# only bounds how stale "last seen" is after a crash. A long interval spares a Pi's
# SD card 10,000 row updates every few seconds, and the event loop the stall that
# each batch's GIL contention costs (seen as heartbeat round-trip tail at 10,000).
LAST_SEEN_INTERVAL = 60.0
HISTORY_CAP = 1000  # points per history reply at most
MAX_WRITE_BUFFER = 8 * 1024 * 1024  # a peer that stops reading replies is dropped
CLOSE_TIMEOUT = 5.0  # seconds a closed connection may take to flush before it is aborted
STALL_WARNING = 1.0  # seconds of event-loop lateness worth a warning
READ_BUFFER = 256 * 1024  # bytes read from a socket at once, shared by all connections
_MAX_ID = 128  # characters of a node_id
_MAX_ROLE = 200  # characters of a role name

_pack = p.HEADER.pack
_parse = p.parse_body


class Counters:
    """The master's own counters, reported in the master dict and by /metrics."""

    __slots__ = (
        "connections_total",
        "connections_open",
        "messages_total",
        "rejected_frames_total",
        "bad_messages_total",
        "auth_failures_total",
        "handshake_timeouts_total",
        "replaced_total",
        "goodbyes_total",
        "closed_without_goodbye_total",
        "silent_deaths_total",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class LogLimiter:
    """At most ``limit`` lines per ``window`` seconds for one kind of event, then a count.

    A few joins or deaths are worth a line each; 10,000 slaves re-joining after a
    restart are worth one summary, not 10,000 lines written from the event loop.
    """

    def __init__(self, what: str, limit: int = 20, window: float = 10.0) -> None:
        self.what = what
        self.limit = limit
        self.window = window
        self.start = 0.0
        self.count = 0
        self.suppressed = 0

    def __call__(self, now: float, level: int, msg: str, *args: Any) -> None:
        if now - self.start >= self.window:
            self.flush(now)
        self.count += 1
        if self.count <= self.limit:
            log.log(level, msg, *args)
        else:
            self.suppressed += 1

    def flush(self, now: float) -> None:
        """Log the count of suppressed lines once their window is over."""
        if now - self.start < self.window:
            return
        if self.suppressed:
            log.log(
                logging.WARNING if "dead" in self.what else logging.INFO,
                "%d more %s in the last %g s (not logged one by one)",
                self.suppressed,
                self.what,
                self.window,
            )
        self.start = now
        self.count = 0
        self.suppressed = 0


# Which counter an error code bumps.
_FRAME_ERRORS = (p.E_BAD_FRAME, p.E_FRAME_TOO_LARGE)
_MESSAGE_ERRORS = (p.E_BAD_MESSAGE, p.E_UNKNOWN_TYPE, p.E_BAD_VERSION)


class Connection(asyncio.BufferedProtocol):
    """One peer: handshake, then messages dispatched by type.

    A BufferedProtocol reading into one buffer shared by every connection (each
    read is consumed at once), so a heartbeat costs no 256 KiB receive buffer.
    """

    def __init__(self, master: Master) -> None:
        self.master = master
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        self.address = ""
        self.decoder = p.FrameDecoder(master.config.cluster.max_frame_size)
        self.nonce = p.new_nonce()
        self.authed = False
        self.kind = ""
        self.name = ""  # node_id/role once known, for log lines
        self.session: Optional[Session] = None
        self.closed = False
        self.said_goodbye = False
        self.timer: Optional[asyncio.TimerHandle] = None

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.address = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        master = self.master
        master.counters.connections_total += 1
        master.counters.connections_open += 1
        master.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timer = master.loop.call_later(
            master.config.cluster.handshake_timeout, self._handshake_timeout
        )
        transport.write(
            p.make(
                p.CHALLENGE,
                protocol=p.PROTOCOL_VERSION,
                nonce=self.nonce,
                max_frame_size=master.config.cluster.max_frame_size,
            )
        )

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        master = self.master
        master.counters.connections_open -= 1
        master.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        session, self.session = self.session, None
        if session is None or master.stopping:
            return
        if master.registry.disconnect(session, self.said_goodbye):
            if self.said_goodbye:
                master.counters.goodbyes_total += 1
                how = "said goodbye"
            else:
                master.counters.closed_without_goodbye_total += 1
                how = "closed its connection without goodbye"
            master.log_leaves(
                master.clock(),
                logging.INFO,
                "node %s role %s %s (%s)",
                session.node.node_id,
                session.role,
                how,
                session.node.state,
            )

    def close(self, code: Optional[str] = None, message: str = "") -> None:
        """Send an ``error`` frame (when ``code``) and close; used for replaced/swept sessions."""
        if self.closed or self.transport is None:
            return
        if code is not None:
            self.transport.write(p.make(p.ERROR, code=code, message=message))
        self.closed = True
        self.transport.close()
        # close() waits for queued bytes to be sent: a peer that is gone or never
        # reads would hold its socket forever, so drop it hard after a while.
        self.master.loop.call_later(self.master.close_timeout, self.transport.abort)

    def fail(self, code: str, message: str) -> None:
        """Refuse bad input: one log line with the peer, counters, ``error`` frame, close."""
        if self.closed:
            return
        counters = self.master.counters
        if code in _FRAME_ERRORS:
            counters.rejected_frames_total += 1
        elif code in _MESSAGE_ERRORS:
            counters.rejected_frames_total += 1
            counters.bad_messages_total += 1
        elif code == p.E_AUTH_FAILED:
            counters.auth_failures_total += 1
        elif code == p.E_HANDSHAKE_TIMEOUT:
            counters.handshake_timeouts_total += 1
        who = f" ({self.name})" if self.name else ""
        self.master.log_refusals(
            self.master.clock(),
            logging.WARNING,
            "peer %s%s: %s: %s; closing",
            self.peer,
            who,
            code,
            message,
        )
        self.close(code, message)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if not self.authed:
            stalled = (
                f", {self.decoder.pending} bytes of a frame pending" if self.decoder.pending else ""
            )
            limit = self.master.config.cluster.handshake_timeout
            self.fail(p.E_HANDSHAKE_TIMEOUT, f"no valid hello within {limit:g} s{stalled}")

    # ---------------------------------------------------------------- input

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.master.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.master.read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            bodies = self.decoder.feed(data)
        except p.ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        if not bodies:
            return
        master = self.master
        master.counters.messages_total += len(bodies)
        for body in bodies:
            if self.closed:
                return
            if not self.authed:
                self._hello(body)
                continue
            try:
                message = _parse(body)
            except p.ProtocolError as exc:
                self.fail(exc.code, exc.message)
                return
            # The hot path: a well-formed heartbeat, checked inline (no generic validate).
            if type(message) is dict and message.get("type") == "heartbeat":
                seq = message.get("seq")
                sent_at = type(message.get("sent_at"))
                if type(seq) is int and (sent_at is float or sent_at is int):
                    session = self.session
                    if session is not None:
                        now = master.clock()
                        session.seen = now
                        node = session.node
                        node.seen = now
                        if node.state != "alive":
                            master.registry.heard(session)
                    body = b'{"type":"heartbeat_ack","seq":%d}' % seq
                    self.transport.write(_pack(len(body)) + body)  # type: ignore[union-attr]
                    continue
            try:
                message = p.validate(message)
            except p.ProtocolError as exc:
                self.fail(exc.code, exc.message)
                return
            msg_type = message["type"]
            session = self.session
            if msg_type == p.HEARTBEAT:
                if session is not None:
                    master.registry.heard(session)
                self.transport.write(_ack(message["seq"]))  # type: ignore[union-attr]
            elif msg_type == p.VITALS:
                if session is None:
                    self.fail(p.E_BAD_MESSAGE, "only a slave connection may send vitals")
                    return
                master.registry.heard(session)
                master.registry.vitals(session, message["vitals"])
            elif msg_type == p.ACTION_ERROR:
                if session is None:
                    self.fail(p.E_BAD_MESSAGE, "only a slave connection may send action_error")
                    return
                master.registry.heard(session)
                master.registry.action_error(session, message["error"][:2000], message["count"])
            elif msg_type == p.QUERY:
                if session is not None:
                    master.registry.heard(session)
                self._query(message)
            elif msg_type == p.GOODBYE:
                self.said_goodbye = True
                self.closed = True
                self.transport.close()  # type: ignore[union-attr]
                return
            else:
                self.fail(p.E_BAD_MESSAGE, f"a peer may not send {msg_type!r} messages")
                return

    def _hello(self, body: bytes) -> None:
        master = self.master
        try:
            raw = _parse(body)
        except p.ProtocolError as exc:
            self.fail(exc.code, f"first {exc.message}")
            return
        if isinstance(raw, dict) and raw.get("type") == p.HELLO:
            if raw.get("protocol") != p.PROTOCOL_VERSION:
                self.fail(
                    p.E_BAD_VERSION,
                    f"peer speaks protocol {str(raw.get('protocol'))[:20]},"
                    f" this master speaks {p.PROTOCOL_VERSION}",
                )
                return
            if not raw.get("mac"):
                self.name = _name(raw)
                self.fail(p.E_AUTH_FAILED, "hello carries no mac: the peer has no cluster secret")
                return
        try:
            hello = p.validate(raw)
        except p.ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        if hello["type"] != p.HELLO:
            self.fail(p.E_BAD_MESSAGE, f"expected a hello message, got {hello['type']!r}")
            return
        kind, node_id, role = hello["kind"], hello["node_id"], hello["role"]
        problem = _check_hello(hello)
        if problem:
            self.fail(p.E_BAD_MESSAGE, problem)
            return
        self.name = f"node_id={node_id} role={role} kind={kind}"
        secret = master.config.cluster.secret
        expected = p.hello_mac(secret, self.nonce, hello["nonce"], kind, node_id, role)
        if not p.macs_equal(hello["mac"], expected):
            self.fail(p.E_AUTH_FAILED, "hello mac does not match: wrong cluster secret")
            return
        self.authed = True
        self.kind = kind
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.write(  # type: ignore[union-attr]
            p.make(
                p.WELCOME,
                protocol=p.PROTOCOL_VERSION,
                mac=p.welcome_mac(secret, hello["nonce"], self.nonce),
                master=master.master_dict(full=False),
            )
        )
        if kind == p.KIND_SLAVE:
            session, old = master.registry.register(
                node_id, role, self.address, hello.get("details") or {}, self
            )
            self.session = session
            if old is not None:
                master.counters.replaced_total += 1
                master.log_joins(
                    master.clock(),
                    logging.INFO,
                    "node %s role %s: newer connection from %s replaces the older one",
                    node_id,
                    role,
                    self.peer,
                )
                old.conn.close(
                    p.E_REPLACED, f"a newer connection for node {node_id} role {role} took over"
                )
            else:
                master.log_joins(
                    master.clock(),
                    logging.INFO,
                    "node %s role %s joined from %s",
                    node_id,
                    role,
                    self.peer,
                )

    # -------------------------------------------------------------- queries

    def _query(self, message: dict[str, Any]) -> None:
        qid = message["id"]
        what = message["what"]
        try:
            if what == "cluster":
                offset = _int_field(message, "offset", 0, 0)
                limit = _int_field(message, "limit", 1 << 30, 1)
                self.send(self.master.cluster_page(qid, offset, limit))
            elif what == "node":
                node_id = message.get("node_id")
                if not isinstance(node_id, str):
                    raise _QueryError(p.E_BAD_MESSAGE, "query node needs a string field 'node_id'")
                node = self.master.registry.nodes.get(node_id)
                if node is None:
                    raise _QueryError(p.E_NOT_FOUND, f"no node {node_id[:_MAX_ID]!r}")
                self.send(_reply(qid, self.master.registry.node_dict(node)))
            elif what == "history":
                self._history(message)
            else:
                raise _QueryError(
                    p.E_BAD_MESSAGE,
                    f"unknown query {what[:40]!r} (known: cluster, node, history)",
                )
        except _QueryError as exc:
            self.master.counters.bad_messages_total += 1
            self.send(
                p.make(p.REPLY, id=qid, ok=False, error={"code": exc.code, "message": exc.message})
            )

    def _history(self, message: dict[str, Any]) -> None:
        qid = message["id"]
        node_id = message.get("node_id")
        if not isinstance(node_id, str):
            raise _QueryError(p.E_BAD_MESSAGE, "query history needs a string field 'node_id'")
        if node_id not in self.master.registry.nodes:
            raise _QueryError(p.E_NOT_FOUND, f"no node {node_id[:_MAX_ID]!r}")
        since = message.get("since")
        if since is not None and (not isinstance(since, (int, float)) or isinstance(since, bool)):
            raise _QueryError(p.E_BAD_MESSAGE, "query history field 'since' must be a number")
        limit = _int_field(message, "limit", HISTORY_CAP, 1)
        limit = min(limit, HISTORY_CAP)
        master = self.master
        budget = master.config.cluster.max_frame_size // 2
        loop = master.loop

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(self._history_done, qid, node_id, result)

        master._flush()  # the read then sees every point received so far
        master.store.read(lambda conn: read_history(conn, node_id, since, limit, budget), done)

    def _history_done(self, qid: int, node_id: str, result: Any) -> None:
        if isinstance(result, Exception):
            log.error("history of node %s could not be read: %s", node_id, result)
            self.send(
                p.make(
                    p.REPLY,
                    id=qid,
                    ok=False,
                    error={"code": "internal", "message": "history could not be read"},
                )
            )
            return
        points, more = result
        body = (
            f'{{"type":"reply","id":{qid},"ok":true,"data":{{"node_id":{json.dumps(node_id)},'
            f'"points":{points},"more":{"true" if more else "false"}}}}}'
        ).encode()
        self.send(_pack(len(body)) + body)

    def send(self, frame: bytes) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(frame)
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.fail(p.E_BAD_MESSAGE, "peer does not read its replies")


class _QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _ack(seq: int) -> bytes:
    body = b'{"type":"heartbeat_ack","seq":%d}' % seq
    return _pack(len(body)) + body


def _reply(qid: int, data: Any) -> bytes:
    return p.make(p.REPLY, id=qid, ok=True, data=data)


def _name(raw: dict[str, Any]) -> str:
    return f"node_id={str(raw.get('node_id'))[:_MAX_ID]} role={str(raw.get('role'))[:40]}"


def _int_field(message: dict[str, Any], field: str, default: int, minimum: int) -> int:
    value = message.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _QueryError(
            p.E_BAD_MESSAGE, f"query field {field!r} must be a whole number >= {minimum}"
        )
    return value


def _printable(text: str) -> bool:
    return text.isprintable() and text == text.strip()


def _check_hello(hello: dict[str, Any]) -> str:
    """What is wrong with an otherwise well-typed hello, or ''."""
    kind, node_id, role, nonce = hello["kind"], hello["node_id"], hello["role"], hello["nonce"]
    if kind not in (p.KIND_SLAVE, p.KIND_CLIENT):
        return f"hello kind {kind[:20]!r} is neither 'slave' nor 'client'"
    if not 0 < len(node_id) <= _MAX_ID or not _printable(node_id):
        return f"hello node_id must be 1..{_MAX_ID} printable characters"
    if not 0 < len(role) <= _MAX_ROLE or not _printable(role):
        return f"hello role must be 1..{_MAX_ROLE} printable characters"
    if not 16 <= len(nonce) <= 128:
        return "hello nonce must be 16..128 characters"
    if "details" in hello and not isinstance(hello["details"], dict):
        return "hello details must be a JSON object"
    return ""


class Master:
    """The rpicluster master: ``start()``, ``cluster_state()``, ``stop()``, ``run_forever()``."""

    def __init__(self, config: Config) -> None:
        if config.master is None:
            raise ValueError(f"{config.path}: a master needs a [master] section")
        self.config = config
        cluster = config.cluster
        self.registry = Registry(cluster.suspect_after, cluster.dead_after)
        self.clock = self.registry.clock
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self.counters = Counters()
        self.connections: set[Connection] = set()
        self.store: Store = None  # type: ignore[assignment]  # opened by start()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.port = config.master.socket_port
        self.stopping = False
        self.started_at = 0.0
        self.hostname = socket.gethostname()
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._timers: list[asyncio.TimerHandle] = []
        self._last_sweep = self.clock()
        self.close_timeout = CLOSE_TIMEOUT
        self.log_joins = LogLimiter("joins")
        self.log_leaves = LogLimiter("disconnections")
        self.log_deaths = LogLimiter("silent nodes marked dead")
        self.log_refusals = LogLimiter("refused connections")
        # Often enough to mark a silent node dead well within dead_after + 0.5 s,
        # rarely enough to cost nothing with 10,000 nodes.
        self.sweep_interval = min(0.25, max(0.02, cluster.dead_after / 20))

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the store, load the known nodes, listen; returns once accepting."""
        settings = self.config.master
        assert settings is not None
        self.store = Store(settings.state_dir, settings.history_window)
        rows = self.store.load_nodes()
        self.registry.load(rows)
        self.started_at = round(self.registry.wall(), 3)
        self.store.start()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="rpicluster-master", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join(5)
            self.store.close()
            raise
        log.info(
            "master listening on %s:%d (%d known nodes loaded from %s)",
            settings.socket_bind_ip,
            self.port,
            len(rows),
            self.store.path,
        )

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self.loop = asyncio.new_event_loop()
        settings = self.config.master
        assert settings is not None
        try:
            self._server = loop.run_until_complete(
                loop.create_server(
                    lambda: Connection(self),
                    host=settings.socket_bind_ip or None,
                    port=settings.socket_port,
                    backlog=LISTEN_BACKLOG,
                    reuse_address=True,
                )
            )
        except BaseException as exc:
            loop.close()
            ready.set_exception(
                OSError(
                    f"master cannot listen on {settings.socket_bind_ip}:{settings.socket_port}:"
                    f" {exc}"
                )
            )
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._every(self.sweep_interval, self._sweep)
        self._every(FLUSH_INTERVAL, self._flush)
        self._every(LAST_SEEN_INTERVAL, self._flush_last_seen)
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _every(self, interval: float, fn: Any) -> None:
        def tick() -> None:
            try:
                fn()
            except Exception:
                log.exception("periodic %s failed", getattr(fn, "__name__", fn))
            self._timers.append(self.loop.call_later(interval, tick))
            if len(self._timers) > 16:
                del self._timers[:-8]

        self._timers.append(self.loop.call_later(interval, tick))

    def stop(self, timeout: float = 5.0) -> None:
        """Say goodbye to every peer, close, flush the store; idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        if thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            try:
                future.result(timeout)
            except concurrent.futures.TimeoutError:
                log.error("master shutdown did not finish within %g s; stopping anyway", timeout)
                self.loop.call_soon_threadsafe(self.loop.stop)
            except Exception as exc:  # still stop the loop and close the store
                log.error("master shutdown failed: %r; stopping anyway", exc)
                self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join(timeout)
        self.store.close(timeout)
        log.info("master stopped")

    async def _shutdown(self) -> None:
        self.stopping = True
        for timer in self._timers:
            timer.cancel()
        if self._server is not None:
            self._server.close()
        goodbye = p.make(p.GOODBYE, reason="master shutting down")
        for conn in list(self.connections):
            if not conn.closed and conn.transport is not None:
                conn.transport.write(goodbye)
                conn.closed = True
                conn.transport.close()
        for _ in range(100):  # let the transports flush and close
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self._flush()
        self.store.save_last_seen(self.registry.last_seen_rows())
        self.loop.call_soon(self.loop.stop)

    def run_forever(self) -> None:
        """Start, block until SIGTERM or SIGINT, then stop cleanly (``rpicluster-master``)."""
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(1.0):
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("master event loop ended unexpectedly")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --------------------------------------------------------- periodic work

    def _sweep(self) -> None:
        registry = self.registry
        now = self.clock()
        late = now - self._last_sweep - self.sweep_interval
        self._last_sweep = now
        if late > STALL_WARNING:
            # A starved CPU or a blocked disk: say so, or the deaths that follow look random.
            log.warning("event loop ran %.1f s late (master starved of CPU or blocked)", late)
        for limiter in (self.log_joins, self.log_leaves, self.log_deaths, self.log_refusals):
            limiter.flush(now)
        closed_nodes = set()
        for session in registry.sweep(grace=late):
            node = session.node
            session.conn.close()
            if node.node_id not in closed_nodes:
                closed_nodes.add(node.node_id)
                if node.state == DEAD:
                    self.counters.silent_deaths_total += 1
                self.log_deaths(
                    now,
                    logging.WARNING,
                    "node %s (%s) silent for more than %g s: %s, closing its connection",
                    node.node_id,
                    node.hostname,
                    registry.dead_after,
                    node.state if node.state == DEAD else f"role {session.role} dropped",
                )

    def _flush(self) -> None:
        self.store.save_nodes(self.registry.take_dirty_rows())
        self.store.add_vitals(self.registry.take_vitals())

    def _flush_last_seen(self) -> None:
        self.store.save_last_seen(self.registry.last_seen_rows())

    # ---------------------------------------------------------------- views

    def master_dict(self, full: bool = True) -> dict[str, Any]:
        """The master dict; ``full`` adds counters and node counts (not in ``welcome``)."""
        cluster = self.config.cluster
        info: dict[str, Any] = {
            "hostname": self.hostname,
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
            "started_at": self.started_at,
            "heartbeat_interval": cluster.heartbeat_interval,
            "suspect_after": cluster.suspect_after,
            "dead_after": cluster.dead_after,
            "max_frame_size": cluster.max_frame_size,
        }
        if full:
            info["nodes"] = self.registry.counts()
            info["counters"] = self.counters.as_dict()
        return info

    def cluster_page(self, qid: int, offset: int, limit: int) -> bytes:
        """One ``reply`` frame of the cluster query, filled to half a frame at most."""
        registry = self.registry
        nodes = list(registry.nodes.values())
        total = len(nodes)
        budget = self.config.cluster.max_frame_size // 2
        head = json.dumps(self.master_dict())
        size = len(head) + 200
        parts: list[str] = []
        index = offset
        while index < total and len(parts) < limit:
            text = json.dumps(registry.node_dict(nodes[index]))
            if parts and size + len(text) + 1 > budget:
                break
            parts.append(text)
            size += len(text) + 1
            index += 1
        next_offset = index if index < total else None
        body = (
            f'{{"type":"reply","id":{qid},"ok":true,"data":{{"master":{head},'
            f'"nodes":[{",".join(parts)}],"total":{total},'
            f'"next_offset":{"null" if next_offset is None else next_offset}}}}}'
        ).encode()
        return _pack(len(body)) + body

    def cluster_state(self) -> dict[str, Any]:
        """The whole cluster document (all pages), safe to call from any thread."""

        def build() -> dict[str, Any]:
            registry = self.registry
            nodes = [registry.node_dict(node) for node in registry.nodes.values()]
            return {
                "master": self.master_dict(),
                "nodes": json.loads(json.dumps(nodes)),  # a copy the caller may keep
                "total": len(nodes),
                "next_offset": None,
            }

        loop = self.loop
        thread = self._thread
        if loop is None or thread is None or not thread.is_alive() or loop.is_closed():
            return build()
        if threading.current_thread() is thread:
            return build()
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(build())
            except Exception as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(10.0)
