"""Who may hold a connection to the master before proving membership.

A stranger on the LAN needs no secret to open TCP connections, so everything a
connection costs before its ``hello`` is bounded here:

- ``max_connections``: open connections of any kind; a new one beyond it is
  refused at once (one ``error`` frame ``too_many_connections``, then closed).
- ``max_unauthenticated_per_address``: connections one source address may hold
  before authenticating; a new one beyond it is refused the same way.
- ``max_unauthenticated``: connections all addresses together may hold before
  authenticating. When it is full a new connection is still admitted, and the
  oldest unauthenticated connection *of the address holding the most* is
  evicted (closed at once). So strangers can never lock out a slave or
  ``rpicluster status``: a legitimate peer holds one pending connection for one
  round trip, while the attacker's address is always the biggest holder; and
  when everyone shares one address (NAT, loopback), the oldest pending
  connection goes, which is an idle stranger, not a peer mid-handshake.

Authenticated connections leave the unauthenticated table, so the fleet is only
ever bounded by ``max_connections``. Everything here is O(1) per connection but
the eviction, which is O(addresses holding pending connections).
"""

from __future__ import annotations

from typing import Any, Optional


class Admission:
    """The unauthenticated table: pending connections by address, oldest first."""

    def __init__(self, max_connections: int, max_pending: int, max_pending_per_address: int):
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.open = 0  # admitted and not yet released, authenticated or not
        self.pending = 0
        # address -> {connection: None}, each in arrival order (dicts keep it)
        self.by_address: dict[str, dict[Any, None]] = {}

    def refuse_reason(self, address: str) -> str:
        """Why a new connection from ``address`` must be refused, or ''."""
        if self.open >= self.max_connections:
            return f"{self.open} connections open, the limit is {self.max_connections}"
        held = self.by_address.get(address)
        if held is not None and len(held) >= self.max_pending_per_address:
            return (
                f"{len(held)} unauthenticated connections from {address},"
                f" the limit is {self.max_pending_per_address}"
            )
        return ""

    def admit(self, conn: Any, address: str) -> Optional[Any]:
        """Record a new pending connection; returns the connection to evict, if any."""
        victim = None
        if self.pending >= self.max_pending:
            victim = self._oldest_of_biggest()
            if victim is not None:
                self.authenticated(victim)  # leaves the table now; the caller closes it
        self.by_address.setdefault(address, {})[conn] = None
        self.pending += 1
        self.open += 1
        return victim

    def _oldest_of_biggest(self) -> Optional[Any]:
        if not self.by_address:
            return None
        biggest = max(self.by_address.values(), key=len)
        return next(iter(biggest))

    def authenticated(self, conn: Any) -> None:
        """``conn`` proved membership (or was evicted): it no longer holds a pending slot."""
        held = self.by_address.get(conn.address)
        if held is not None and held.pop(conn, False) is None:
            self.pending -= 1
            if not held:
                del self.by_address[conn.address]

    def release(self, conn: Any) -> None:
        """``conn`` closed: free its slots."""
        self.authenticated(conn)
        self.open -= 1
