"""The master's side of the handshake: challenge, then a ``hello`` checked in protocol order.

Split from ``connection.py`` because admitting a peer is the security boundary:
a stranger's first frames meet only this code, the checks run in the order
docs/protocol.md section 4 gives (so a stranger learns nothing about the limits
before proving the secret), one timer bounds the whole handshake (TLS included),
and a copied SD card claiming a node id already held is refused here
(``duplicate_id``). ``Handshake`` is a mixin of ``Connection``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

from rpicluster import memberdata as md
from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.master.registry import MAX_ROLES, Node, Session

if TYPE_CHECKING:
    from rpicluster.master.server import Master

log = logging.getLogger("rpicluster.master")

_MAX_ID = md.MAX_NODE_ID  # characters of a node_id
_MAX_ROLE = md.MAX_ROLE  # characters of a role name

_parse = p.parse_body


class Handshake:
    """The handshake for ``Connection`` (a mixin: the attributes below are the connection's)."""

    master: Master
    write: Callable[[bytes], None]
    nonce: str
    authed: bool
    kind: str
    name: str
    identity: str
    address: str
    peer: str
    session: Optional[Session]
    timer: Optional[asyncio.TimerHandle]
    decoder: p.FrameDecoder
    tls: Optional[tlsmod.ServerTls]

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


def _name(raw: dict[str, Any]) -> str:
    """node_id/role of a refused hello for a log line: cut, and repr() escapes controls."""
    return f"node_id={str(raw.get('node_id'))[:_MAX_ID]!r} role={str(raw.get('role'))[:40]!r}"


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
