"""One peer of the master: its session from accept to close, messages dispatched by type.

Split from the master's lifecycle (``server.py``) along the protocol seam: this
module is what a byte from the network meets first. Callbacks instead of a
coroutine per connection or per message keep a heartbeat to a few tens of
microseconds, which is what lets one Pi core serve 10,000 slaves.

A ``Connection`` is assembled from its seams: this module holds the session
loop (bytes to frames to messages, the heartbeat hot path, vitals rate limits,
refusing and closing), ``handshake.py`` the challenge and the ``hello``,
``peertls.py`` the TLS layer and the certificate's identity, and ``queries.py``
the answers to queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Callable, Optional

from rpicluster import memberdata as md
from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.master.handshake import Handshake
from rpicluster.master.peertls import PeerTls
from rpicluster.master.queries import Queries
from rpicluster.master.registry import Session

if TYPE_CHECKING:
    from rpicluster.master.server import Master

log = logging.getLogger("rpicluster.master")

MAX_WRITE_BUFFER = 8 * 1024 * 1024  # a peer that stops reading replies is dropped
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


class Connection(Handshake, PeerTls, Queries, asyncio.BufferedProtocol):
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

    def evict(self, why: str = "oldest of the address holding the most") -> None:
        """Make room in the full unauthenticated table (admission.py): close at once."""
        master = self.master
        master.counters.connections_evicted_total += 1
        master.log_refusals(
            master.clock(),
            logging.WARNING,
            "peer %s evicted: unauthenticated table full, %s",
            self.peer,
            why,
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

    def send(self, frame: bytes) -> None:
        if self.closed or self.transport is None:
            return
        self.write(frame)
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.fail(p.E_BAD_MESSAGE, "peer does not read its replies")


def _nowhere(data: bytes) -> None:
    """The writer of a connection not yet made: drops (nothing can be sent yet)."""
