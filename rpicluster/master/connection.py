"""One peer of the master: the handshake, then messages dispatched by type.

Split from the master's lifecycle (``server.py``) along the protocol seam: this
module is what a byte from the network meets first. Callbacks instead of a
coroutine per connection or per message keep a heartbeat to a few tens of
microseconds, which is what lets one Pi core serve 10,000 slaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import protocol as p
from rpicluster.master.registry import Session
from rpicluster.master.store import read_history

if TYPE_CHECKING:
    from rpicluster.master.server import Master

log = logging.getLogger("rpicluster.master")

HISTORY_CAP = 1000  # points per history reply at most
MAX_WRITE_BUFFER = 8 * 1024 * 1024  # a peer that stops reading replies is dropped
_MAX_ID = 128  # characters of a node_id
_MAX_ROLE = 200  # characters of a role name

_pack = p.HEADER.pack
_parse = p.parse_body

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
