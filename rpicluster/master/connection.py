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
import ssl
from typing import TYPE_CHECKING, Any, Callable, Optional

from rpicluster import memberdata as md
from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.master.registry import MAX_ROLES, Node, Session, node_label
from rpicluster.master.store import read_history

if TYPE_CHECKING:
    from rpicluster.master.server import Master

log = logging.getLogger("rpicluster.master")

HISTORY_CAP = 1000  # points per history reply at most; a larger limit is bad_message
MAX_WRITE_BUFFER = 8 * 1024 * 1024  # a peer that stops reading replies is dropped
_MAX_ID = md.MAX_NODE_ID  # characters of a node_id
_MAX_ROLE = md.MAX_ROLE  # characters of a role name
# Vitals per (node, role): a token bucket of VITALS_BURST reports refilled at
# VITALS_RATE a second. The `vitals` role's shortest interval (0.05 s) is exactly
# the rate, so no well-configured role is ever refused. Refused reports are
# strikes that drain at the same rate; a connection with more than MAX_STRIKES
# (refusals outrunning the rate by 2x for ~20 s, or a flood) is closed.
VITALS_RATE = 20.0
VITALS_BURST = 40.0
MAX_STRIKES = 400.0
NOTICE_INTERVAL = 1.0  # seconds between two ``refused`` notices on one connection

_pack = p.HEADER.pack
_parse = p.parse_body

# Which counter an error code bumps.
_FRAME_ERRORS = (p.E_BAD_FRAME, p.E_FRAME_TOO_LARGE)
_MESSAGE_ERRORS = (
    p.E_BAD_MESSAGE,
    p.E_UNKNOWN_TYPE,
    p.E_BAD_VERSION,
    p.E_TOO_MANY_ROLES,
    p.E_RATE_EXCEEDED,
)


def fit_node(node: dict[str, Any], budget: int) -> str:
    """The node as JSON of at most ``budget`` bytes: trimmed when the whole does not fit.

    With the member-data limits a node never needs trimming at the default frame
    size; this keeps the promise that no reply overflows a frame whatever is stored
    (an old database, a small max_frame_size). A trimmed node has ``truncated``.
    """
    text = json.dumps(node)
    if len(text) <= budget:
        return text
    stub = {**node, "details": {}, "vitals": None, "action_errors": {}, "truncated": True}
    text = json.dumps(stub)
    if len(text) <= budget:
        return text
    stub["roles"] = []
    return json.dumps(stub)


class Connection(asyncio.BufferedProtocol):
    """One peer: handshake, then messages dispatched by type.

    A BufferedProtocol reading into one buffer shared by every connection (each
    read is consumed at once), so a heartbeat costs no 256 KiB receive buffer.
    """

    def __init__(self, master: Master, address: str = "", peer: str = "?") -> None:
        self.master = master
        self.transport: Optional[asyncio.Transport] = None
        self.peer = peer
        self.address = address
        # A hello is tiny: until the peer is a member it may send small frames only.
        self.decoder = p.FrameDecoder(
            min(p.PREAUTH_MAX_FRAME_SIZE, master.config.cluster.max_frame_size)
        )
        self.evicted = False
        self.strikes = 0.0  # refused messages, draining at VITALS_RATE a second
        self.strikes_at = 0.0
        self.notice_at = -NOTICE_INTERVAL
        self.unnoticed = 0  # refusals not yet told in a ``refused`` notice
        self.nonce = p.new_nonce()
        self.authed = False
        self.kind = ""
        self.name = ""  # node_id/role once known, for log lines
        self.session: Optional[Session] = None
        self.closed = False
        self.said_goodbye = False
        self.timer: Optional[asyncio.TimerHandle] = None
        # With [tls]: the connection's TLS layer, and who its certificate speaks for.
        self.tls: Optional[tlsmod.ServerTls] = None
        self.identity = ""
        self.cert_not_after: Optional[float] = None
        self.write: Callable[[bytes], None] = _nowhere

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.evicted:  # evicted between accept and now
            self.closed = True
            transport.abort()
            return
        if not self.address:
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
        # One timer from accept to a valid hello: the TLS handshake runs inside it.
        self.timer = master.loop.call_later(
            master.config.cluster.handshake_timeout, self._handshake_timeout
        )
        if master.tls_context is not None:
            self.tls = tlsmod.ServerTls(master.tls_context)
            self.write = self._tls_write
            return  # the challenge follows the TLS handshake (_tls_ready)
        self.write = transport.write
        self._challenge()

    def _challenge(self) -> None:
        master = self.master
        self.write(
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
        master.admission.release(self)
        if self.evicted and self not in master.connections:
            return  # never counted as open
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
            self.write(p.make(p.ERROR, code=code, message=message))
        self.closed = True
        self.transport.close()
        # close() waits for queued bytes to be sent: a peer that is gone or never
        # reads would hold its socket forever, so drop it hard after a while.
        self.master.loop.call_later(self.master.close_timeout, self.transport.abort)

    def evict(self) -> None:
        """Make room in the full unauthenticated table (admission.py): close at once."""
        master = self.master
        master.counters.connections_evicted_total += 1
        master.log_refusals(
            master.clock(),
            logging.WARNING,
            "peer %s evicted: unauthenticated table full (oldest of its address)",
            self.peer,
        )
        self.evicted = True
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def refuse(self, code: str, message: str) -> None:
        """Refuse one message but keep the connection: a ``refused`` notice, at most 1/s.

        Strikes drain at VITALS_RATE a second; past MAX_STRIKES the peer is abusive
        and the connection is closed (``rate_exceeded``).
        """
        master = self.master
        now = master.clock()
        self.strikes = max(0.0, self.strikes - (now - self.strikes_at) * VITALS_RATE) + 1
        self.strikes_at = now
        if self.strikes > MAX_STRIKES:
            self.fail(p.E_RATE_EXCEEDED, f"too many refused messages ({code}: {message})")
            return
        self.unnoticed += 1
        if now - self.notice_at < NOTICE_INTERVAL:
            return
        master.log_members(
            now, logging.WARNING, "peer %s (%s): %s: %s", self.peer, self.name, code, message
        )
        self.send(p.make(p.REFUSED, code=code, message=message, count=self.unnoticed))
        self.notice_at = now
        self.unnoticed = 0

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
        elif code == p.E_BAD_DETAILS:
            counters.details_refused_total += 1
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
            if self.tls is not None and not self.tls.ready:
                stalled = ", TLS handshake not finished"
            limit = self.master.config.cluster.handshake_timeout
            self.fail(p.E_HANDSHAKE_TIMEOUT, f"no valid hello within {limit:g} s{stalled}")

    # ---------------------------------------------------------------- input

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.master.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self.master.read_buffer[:nbytes].tobytes()
        if self.tls is not None:
            data = self._tls_in(data)
            if not data:
                return
        self.data_received(data)

    # ------------------------------------------------------------------ TLS

    def _tls_write(self, data: bytes) -> None:
        tls = self.tls
        if tls is None or not tls.ready or self.transport is None:
            return  # nothing of the protocol crosses before the TLS handshake
        self.transport.write(tls.encrypt(data))

    def _tls_in(self, data: bytes) -> bytes:
        """Ciphertext in, plaintext out; the handshake's records go back at once."""
        tls = self.tls
        assert tls is not None and self.transport is not None
        if self.closed:
            return b""
        was_ready = tls.ready
        try:
            plain = tls.feed(data)
        except ssl.SSLError as exc:
            out = tls.output()
            if out:
                self.transport.write(out)  # the alert tells the peer why
            self._tls_failed(exc)
            return b""
        out = tls.output()
        if out:
            self.transport.write(out)
        if not was_ready and tls.ready and not self._tls_ready():
            return b""
        return plain

    def _tls_failed(self, exc: BaseException) -> None:
        master = self.master
        master.counters.tls_failures_total += 1
        master.log_refusals(
            master.clock(),
            logging.WARNING,
            "peer %s: TLS handshake failed: %s; closing",
            self.peer,
            tlsmod.explain(exc),
        )
        self.close()

    def _tls_ready(self) -> bool:
        """The peer holds a certificate of the cluster CA: note whose, then challenge it."""
        assert self.tls is not None
        cert = self.tls.peer_cert()
        name = tlsmod.peer_identity(cert)
        if md.check_name(name, md.MAX_STRING):
            self.master.counters.identity_refused_total += 1
            self.fail(p.E_IDENTITY, "the certificate names no identity (subject commonName)")
            return False
        self.identity = name
        self.cert_not_after = tlsmod.peer_not_after(cert)
        self._challenge()
        return True

    def _check_identity(self, node_id: str, details: dict[str, Any]) -> str:
        """Why this certificate may not speak as ``node_id`` with these details, or ''.

        A Pi's certificate lets it speak only as itself: the node name it claims
        must be the certificate's, a node id bound to another certificate is
        refused, and one certificate holds one node id at a time.
        """
        name = self.identity
        claimed = details.get("node_name")
        if claimed is not None and claimed != name:
            return f"hello names node {str(claimed)[:64]!r} but the certificate is {name!r}"
        registry = self.master.registry
        node = registry.nodes.get(node_id)
        bound = bound_identity(node) if node is not None else ""
        if bound and bound != name:
            return f"node id {node_id} belongs to certificate {bound!r}, not {name!r}"
        other = self.master.identities.get(name)
        if other is not None and other != node_id:
            holder = registry.nodes.get(other)
            if holder is not None and holder.sessions:
                return f"certificate {name!r} already speaks as node {other}, which is connected"
        return ""

    def _bind_identity(self, node_id: str, details: dict[str, Any]) -> dict[str, Any]:
        """Record that ``node_id`` is this certificate's node; the details to store."""
        master = self.master
        name = self.identity
        other = master.identities.get(name)
        if other is not None and other != node_id and other in master.registry.nodes:
            # The same credential with a new node id: the Pi was reinstalled.
            master.forget_node(other, f"certificate {name!r} now speaks as node {node_id}")
        master.identities[name] = node_id
        return {
            **details,
            "node_name": name,
            "tls": {"name": name, "not_after": self.cert_not_after},
        }

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
                    self.write(_pack(len(body)) + body)
                    continue
            try:
                message = p.validate(message)
            except p.ProtocolError as exc:
                self.fail(exc.code, exc.message)
                return
            msg_type = message["type"]
            session = self.session
            # No heartbeat gets here: the strict parser yields exact ints and floats, so
            # every heartbeat validate() accepts took the hot path above.
            if msg_type == p.VITALS:
                if session is None:
                    self.fail(p.E_BAD_MESSAGE, "only a slave connection may send vitals")
                    return
                master.registry.heard(session)
                vitals = message["vitals"]
                if not self._vitals_token(session):
                    master.counters.vitals_rate_limited_total += 1
                    self.refuse(
                        p.E_VITALS_RATE,
                        f"more than {VITALS_RATE:g} vitals reports a second"
                        f" (burst {VITALS_BURST:g}) for this node and role",
                    )
                    continue
                problem = md.check_vitals(vitals)
                if problem:
                    master.counters.vitals_refused_total += 1
                    self.refuse(p.E_BAD_VITALS, problem)
                    continue
                master.registry.vitals(session, vitals)
            elif msg_type == p.ACTION_ERROR:
                if session is None:
                    self.fail(p.E_BAD_MESSAGE, "only a slave connection may send action_error")
                    return
                master.registry.heard(session)
                count = message["count"]
                if count < 0:
                    self.refuse(p.E_BAD_ACTION_ERROR, "action_error count must be >= 0")
                    continue
                master.registry.action_error(session, md.clean_text(message["error"]), count)
            elif msg_type == p.QUERY:
                if session is not None:
                    master.registry.heard(session)
                self._query(message)
            elif msg_type == p.GOODBYE:
                if session is not None:
                    master.registry.heard(session)  # any message is a sign of life
                self.said_goodbye = True
                self.closed = True
                self.transport.close()  # type: ignore[union-attr]
                return
            else:
                self.fail(p.E_BAD_MESSAGE, f"a peer may not send {msg_type!r} messages")
                return

    def _vitals_token(self, session: Session) -> bool:
        """Take one token of the (node, role) bucket; False when it is empty."""
        now = self.master.clock()
        rates = session.node.rates
        bucket = rates.get(session.role)
        if bucket is None:
            bucket = rates[session.role] = [VITALS_BURST, now]
        tokens = min(VITALS_BURST, bucket[0] + (now - bucket[1]) * VITALS_RATE)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _hello(self, body: bytes) -> None:
        master = self.master
        try:
            raw = _parse(body)
        except p.ProtocolError as exc:
            self.fail(exc.code, f"first {exc.message}")
            return
        # The order of these checks is the one docs/protocol.md section 4 gives.
        if not isinstance(raw, dict) or raw.get("type") != p.HELLO:
            what = raw.get("type") if isinstance(raw, dict) else None
            shown = repr(what[:40]) if isinstance(what, str) else "no hello"
            self.fail(p.E_BAD_MESSAGE, f"expected a hello message first, got {shown}")
            return
        version = raw.get("protocol")
        if type(version) is not int or version != p.PROTOCOL_VERSION:
            self.fail(
                p.E_BAD_VERSION,
                f"peer speaks protocol {json.dumps(version)[:20]},"
                f" this master speaks {p.PROTOCOL_VERSION} (a JSON integer)",
            )
            return
        mac = raw.get("mac")
        if not isinstance(mac, str) or not mac:
            self.name = _name(raw)
            self.fail(p.E_AUTH_FAILED, "hello carries no mac: the peer has no cluster secret")
            return
        try:
            hello = p.validate(raw)
        except p.ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        kind, node_id, role = hello["kind"], hello["node_id"], hello["role"]
        problem = _check_hello(hello)
        if problem:
            self.fail(p.E_BAD_MESSAGE, problem)
            return
        self.name = f"node_id={node_id} role={role} kind={kind}"
        if self.identity:
            self.name += f" certificate={self.identity}"
        secret = master.config.cluster.secret
        expected = p.hello_mac(secret, self.nonce, hello["nonce"], kind, node_id, role)
        if not p.macs_equal(hello["mac"], expected):
            self.fail(p.E_AUTH_FAILED, "hello mac does not match: wrong cluster secret")
            return
        details = hello.get("details")
        if kind == p.KIND_SLAVE:
            # Checked after the MAC: a stranger learns nothing about the limits' checks.
            problem = md.check_details({} if details is None else details)
            if problem:
                self.fail(p.E_BAD_DETAILS, problem)
                return
            # "tls" in details is the master's record of a certificate, never a peer's word.
            details = {k: v for k, v in (details or {}).items() if k != "tls"}
            if self.tls is not None:
                # Before duplicate_id: a certificate that does not own the node id
                # must not disturb (or flag) the node that does.
                problem = self._check_identity(node_id, details)
                if problem:
                    master.counters.identity_refused_total += 1
                    self.fail(p.E_IDENTITY, problem)
                    return
            holder = master.registry.holder(node_id, hello.get("instance"))
            if holder is not None:
                self._duplicate_id(holder, details or {})
                return
            node = master.registry.nodes.get(node_id)
            if node is not None and role not in node.roles and len(node.roles) >= MAX_ROLES:
                self.fail(p.E_TOO_MANY_ROLES, f"node {node_id} already has {MAX_ROLES} roles")
                return
            if self.tls is not None:
                details = self._bind_identity(node_id, details)
        self.authed = True
        self.kind = kind
        master.admission.authenticated(self)
        self.decoder.max_frame_size = master.config.cluster.max_frame_size
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.write(
            p.make(
                p.WELCOME,
                protocol=p.PROTOCOL_VERSION,
                mac=p.welcome_mac(secret, hello["nonce"], self.nonce),
                master=master.master_dict(full=False),
            )
        )
        if kind == p.KIND_SLAVE:
            session, old = master.registry.register(
                node_id, role, self.address, details or {}, self, hello.get("instance")
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

    def _duplicate_id(self, node: Node, details: dict[str, Any]) -> None:
        """Refuse a copied card: the machine connected first keeps the node id.

        Replacing the holder (as for a reconnect of the same process) would make
        the two machines take turns every few seconds; refusing the newcomer,
        which then retries only every minute, keeps one steady and flags the node
        ``duplicate_id`` (docs/protocol.md section 7). One log line per node per
        ten minutes at most, however long the copy keeps trying.
        """
        master = self.master
        master.counters.duplicate_ids_total += 1
        hostname = details.get("hostname")
        theirs = self.address
        if isinstance(hostname, str):
            theirs += f" (hostname {hostname})"
        holding = f"{node.address} (hostname {node.hostname})"
        if master.registry.flag_duplicate_id(node, self.address):
            log.warning(
                "node id %s is claimed by %s while %s holds it: a copied SD card?"
                " refused with duplicate_id (%d refusals so far)",
                node.node_id,
                theirs,
                holding,
                master.counters.duplicate_ids_total,
            )
        self.close(
            p.E_DUPLICATE_ID,
            f"node id {node.node_id} is in use by another machine at {holding}: a copied SD"
            " card? Delete node_id in the slave's state_dir on one of the two Pis and restart"
            " its rpicluster-slave",
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
                budget = self.master.config.cluster.max_frame_size // 2
                text = fit_node(self.master.registry.node_dict(node), budget)
                body = f'{{"type":"reply","id":{qid},"ok":true,"data":{text}}}'.encode()
                self.send(_pack(len(body)) + body)
            elif what == "history":
                self._history(message)
            elif what == "forget":
                self._forget(qid, message)
            else:
                raise _QueryError(
                    p.E_BAD_MESSAGE,
                    f"unknown query {what[:40]!r} (known: cluster, node, history, forget)",
                )
        except _QueryError as exc:
            self.master.counters.failed_queries_total += 1
            self.send(
                p.make(p.REPLY, id=qid, ok=False, error={"code": exc.code, "message": exc.message})
            )

    def _forget(self, qid: int, message: dict[str, Any]) -> None:
        """``rpicluster forget``: remove a node and its history (docs/protocol.md 8.5).

        Only a ``client`` connection may ask: a slave role has no business
        removing its peers. A connected node is refused unless ``force`` is true.
        """
        if self.kind != p.KIND_CLIENT:
            raise _QueryError(p.E_BAD_MESSAGE, "only a client connection may ask forget")
        own = self.master.tls_status.get("name")
        if self.tls is not None and self.identity != own:
            # A Pi's credential may read the cluster, not remove its peers.
            raise _QueryError(
                p.E_FORBIDDEN,
                f"forget needs the master's own credential ({own!r}), not {self.identity!r}:"
                " run it on the master",
            )
        wanted = message.get("node")
        force = message.get("force", False)
        if not isinstance(wanted, str) or md.check_name(wanted, md.MAX_STRING):
            raise _QueryError(
                p.E_BAD_MESSAGE, f"query forget needs a field 'node': a name of 1..{md.MAX_STRING}"
            )
        if not isinstance(force, bool):
            raise _QueryError(p.E_BAD_MESSAGE, "query forget field 'force' must be true or false")
        master = self.master
        found = master.registry.find(wanted)
        if not found:
            raise _QueryError(p.E_NOT_FOUND, f"no node {wanted!r}")
        if len(found) > 1:
            ids = ", ".join(sorted(node.node_id for node in found)[:8])
            raise _QueryError(
                p.E_AMBIGUOUS, f"{len(found)} nodes are named {wanted!r} ({ids}): give the node id"
            )
        node = found[0]
        if node.sessions and not force:
            raise _QueryError(
                p.E_CONNECTED,
                f"node {node.node_id} ({wanted}) is connected: stop its slave first, or force",
            )
        data = {
            "node_id": node.node_id,
            "name": node_label(node),
            "state": node.state,
            "connections_closed": master.forget_node(node.node_id, f"forgotten by {self.name}"),
        }
        self.send(p.make(p.REPLY, id=qid, ok=True, data=data))

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
        if limit > HISTORY_CAP:
            raise _QueryError(p.E_BAD_MESSAGE, f"query field 'limit' must be 1..{HISTORY_CAP}")
        master = self.master
        budget = master.config.cluster.max_frame_size // 2
        loop = master.loop

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(self._history_done, qid, node_id, result)

        master._flush()  # the read then sees every point received so far
        master.store.read(lambda conn: read_history(conn, node_id, since, limit, budget), done)

    def _history_done(self, qid: int, node_id: str, result: Any) -> None:
        if isinstance(result, Exception):
            self.master.counters.failed_queries_total += 1
            log.error("history of node %s could not be read: %s", node_id, result)
            self.send(
                p.make(
                    p.REPLY,
                    id=qid,
                    ok=False,
                    error={"code": p.E_INTERNAL, "message": "history could not be read"},
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
        self.write(frame)
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.fail(p.E_BAD_MESSAGE, "peer does not read its replies")


class _QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _nowhere(data: bytes) -> None:
    """The writer of a connection not yet made: drops (nothing can be sent yet)."""


def bound_identity(node: Any) -> str:
    """The certificate name a node was bound to by TLS, or '' (docs/protocol.md 13)."""
    record = node.details.get("tls")
    name = record.get("name") if isinstance(record, dict) else None
    return name if isinstance(name, str) else ""


def _name(raw: dict[str, Any]) -> str:
    """node_id/role of a refused hello for a log line: cut, and repr() escapes controls."""
    return f"node_id={str(raw.get('node_id'))[:_MAX_ID]!r} role={str(raw.get('role'))[:40]!r}"


def _int_field(message: dict[str, Any], field: str, default: int, minimum: int) -> int:
    value = message.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _QueryError(
            p.E_BAD_MESSAGE, f"query field {field!r} must be a whole number >= {minimum}"
        )
    return value


def _check_hello(hello: dict[str, Any]) -> str:
    """What is wrong with an otherwise well-typed hello, or ''."""
    kind, node_id, role, nonce = hello["kind"], hello["node_id"], hello["role"], hello["nonce"]
    if kind not in (p.KIND_SLAVE, p.KIND_CLIENT):
        return f"hello kind {kind[:20]!r} is neither 'slave' nor 'client'"
    if md.check_name(node_id, _MAX_ID):
        return f"hello node_id must be 1..{_MAX_ID} printable characters"
    if md.check_name(role, _MAX_ROLE):
        return f"hello role must be 1..{_MAX_ROLE} printable characters"
    if not 16 <= len(nonce) <= 128 or not md.printable(nonce):
        return "hello nonce must be 16..128 printable characters"
    if "details" in hello and not isinstance(hello["details"], dict):
        return "hello details must be a JSON object"
    if "instance" in hello and md.check_name(hello["instance"], _MAX_ID):
        return f"hello instance must be 1..{_MAX_ID} printable characters"
    return ""
