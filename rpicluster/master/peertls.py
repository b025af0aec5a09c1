"""A peer's TLS layer on the master: the handshake over memory BIOs, and whose certificate it is.

Split from ``connection.py`` because with ``[tls]`` a connection carries a second
protocol under the first: the TLS records go through ``tls.ServerTls`` before the
frame decoder sees a byte, and nothing of the cluster protocol crosses before
the TLS handshake ends. Once it does, the client certificate's name is the
peer's identity: a Pi may then speak only as itself (docs/protocol.md 13), which
``_check_identity`` enforces at the hello and ``_bind_identity`` records.
``PeerTls`` is a mixin of ``Connection``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import memberdata as md
from rpicluster import protocol as p
from rpicluster import tls as tlsmod

if TYPE_CHECKING:
    from rpicluster.master.server import Master


def bound_identity(node: Any) -> str:
    """The certificate name a node was bound to by TLS, or '' (docs/protocol.md 13)."""
    record = node.details.get("tls")
    name = record.get("name") if isinstance(record, dict) else None
    return name if isinstance(name, str) else ""


class PeerTls:
    """TLS for ``Connection`` (a mixin: the attributes below are the connection's)."""

    master: Master
    transport: Optional[asyncio.Transport]
    tls: Optional[tlsmod.ServerTls]
    identity: str
    cert_not_after: Optional[float]
    closed: bool
    peer: str

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
        if not was_ready and (out or tls.ready):
            # The master answered a handshake step: the peer's turn begins (admission.py).
            self.master.admission.progressed(self)
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
