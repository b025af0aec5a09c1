"""Who may hold a connection to the master before proving membership.

A stranger on the LAN needs no secret to open TCP connections, so everything a
connection costs before its ``hello`` is bounded here:

- ``max_connections``: open connections of any kind; a new one beyond it is
  refused at once (one ``error`` frame ``too_many_connections``, then closed).
- ``max_unauthenticated_per_address``: connections one source address may hold
  before authenticating; a new one beyond it is refused the same way.
- ``max_unauthenticated``: connections all addresses together may hold before
  authenticating (the *table*). When it is full and another connection waits,
  ``make_room`` decides:

  1. a **stale** pending connection is evicted (closed at once), the stalest
     first. A connection is stale when the master has been waiting on its peer
     for longer than ``stale_after``: since it was accepted, or since the master
     last answered one of its handshake steps (a TLS flight). Bytes that do not
     complete a step (a slowloris trickling one byte a second) never restart the
     clock, since only the master's answers do, and a stranger can earn at most
     two of those (its ClientHello, a HelloRetryRequest) before it must show a
     certificate of the cluster CA.
  2. otherwise every pending connection is progressing (a fleet reconnecting at
     once after a master restart, a TLS join storm on a starved CPU): the master
     stops accepting for a moment (``listening.ACCEPT_PAUSE``) and the kernel's
     backlog queues the connects for free. Evicting here would close the
     connection that is furthest along and waste the most work, and the retries
     would keep the table full: that is how a storm of 10,000 TLS slaves stalled
     for minutes (bench/results.md).

  ``stale_after`` follows the peers that *did* authenticate: four times the
  longest turn a recent one took (decaying with a half-life of ``TURN_HALF_LIFE``),
  at least ``STALE_MIN`` and at most half of ``handshake_timeout``. Quick peers
  (a quiet LAN, ``rpicluster status``) keep it at ``STALE_MIN``, so idle strangers
  holding every slot delay a newcomer by about that for each tableful of them
  queued ahead of it in the backlog (3,000 idle strangers: 467 ms, bench/results.md;
  evicting the oldest at once, as before, cost 168 ms); a starved storm whose
  handshakes take seconds raises it, so slow but honest peers are not evicted.
  Strangers cannot raise it: only authenticated turns count.

Issue 7's guarantee holds: a stranger holds a pending slot for at most
``stale_after`` per turn (at most three: from accept, and after each of the two
answers it can earn) while someone waits, and for at
most ``handshake_timeout`` in any case, so a slave or ``rpicluster status`` that
reached the backlog is accepted; while the table is full of progressing
connections it waits its turn in the backlog, at worst ``LISTEN_BACKLOG`` connects
ahead of it, and the whole table turns over within ``handshake_timeout``.

Authenticated connections leave the table, so the fleet is only ever bounded by
``max_connections``. Everything here is O(1) per connection and per decision, but
``admit``'s fallback eviction, which is O(addresses holding pending connections).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional

STALE_MIN = 0.2  # seconds a peer's turn may last before it is stale, when peers are quick
STALE_FACTOR = 4.0  # stale after this many times the longest turn of recent joiners
TURN_HALF_LIFE = 10.0  # seconds for a slow joiner's turn to count half as much


class Room(NamedTuple):
    """``make_room``'s decision: the connection to evict, or None to pause accepting."""

    victim: Optional[Any]
    reason: str


class Admission:
    """The unauthenticated table: pending connections by address and by staleness."""

    def __init__(
        self,
        max_connections: int,
        max_pending: int,
        max_pending_per_address: int,
        handshake_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.stale_max = handshake_timeout / 2
        self.clock = clock
        self.open = 0  # admitted and not yet released, authenticated or not
        self.pending = 0
        # address -> {connection: None}, each in arrival order (dicts keep it)
        self.by_address: dict[str, dict[Any, None]] = {}
        # connection -> (when its peer's turn began, its longest finished turn, its
        # address); ordered by the first: the stalest connection is the first item.
        self.turns: dict[Any, tuple[float, float, str]] = {}
        self.slow_turn = 0.0  # longest recent turn of a peer that authenticated
        self.slow_at = 0.0

    # ------------------------------------------------------------ decisions

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

    def full(self) -> bool:
        """True when a new pending connection needs ``make_room`` first."""
        return self.pending >= self.max_pending

    def stale_after(self, now: float) -> float:
        """Seconds the master waits on a peer before its pending connection is stale."""
        return min(self.stale_max, max(STALE_MIN, STALE_FACTOR * self._slow_turn(now)))

    def _slow_turn(self, now: float) -> float:
        """The longest turn of a recent joiner, halved every TURN_HALF_LIFE seconds since."""
        return self.slow_turn * 0.5 ** ((now - self.slow_at) / TURN_HALF_LIFE)

    def make_room(self) -> Room:
        """The table is full and a connection waits: evict the stalest, or pause (None)."""
        now = self.clock()
        limit = self.stale_after(now)
        stalest = next(iter(self.turns.items()), None)
        if stalest is not None and now - stalest[1][0] > limit:
            conn = stalest[0]
            self._remove(conn)  # leaves the table now; the caller closes it
            waited = now - stalest[1][0]
            return Room(conn, f"waited {waited:.2f} s on the peer, stale after {limit:.2f} s")
        return Room(None, f"{self.pending} pending, none stale (after {limit:.2f} s)")

    # ------------------------------------------------------------ the table

    def admit(self, conn: Any, address: str) -> Optional[Any]:
        """Record a new pending connection; returns the connection to evict, if any.

        ``make_room`` has made room before; if the table is full anyway (a caller
        that did not ask), the oldest pending connection of the address holding
        the most goes, so the bound holds whatever the caller does.
        """
        victim = None
        if self.full():
            victim = self._oldest_of_biggest()
            if victim is not None:
                self._remove(victim)
        self.by_address.setdefault(address, {})[conn] = None
        self.turns[conn] = (self.clock(), 0.0, address)
        self.pending += 1
        self.open += 1
        return victim

    def _oldest_of_biggest(self) -> Optional[Any]:
        if not self.by_address:
            return None
        biggest = max(self.by_address.values(), key=len)
        return next(iter(biggest))

    def progressed(self, conn: Any) -> None:
        """The master answered a handshake step of pending ``conn``: its peer's turn begins."""
        turn = self.turns.pop(conn, None)
        if turn is not None:
            now = self.clock()
            self.turns[conn] = (now, max(turn[1], now - turn[0]), turn[2])

    def authenticated(self, conn: Any) -> None:
        """``conn`` proved membership: it leaves the table, and its turns tune ``stale_after``."""
        turn = self.turns.get(conn)
        if turn is not None:
            self._remove(conn)
            now = self.clock()
            self.slow_turn = max(turn[1], now - turn[0], self._slow_turn(now))
            self.slow_at = now

    def release(self, conn: Any) -> None:
        """``conn`` closed: free its slots."""
        self._remove(conn)
        self.open -= 1

    def _remove(self, conn: Any) -> None:
        """Take ``conn`` out of the table (it authenticated, was evicted or closed)."""
        turn = self.turns.pop(conn, None)
        if turn is None:
            return  # not pending: authenticated or removed already
        address = turn[2]
        held = self.by_address[address]
        del held[conn]
        self.pending -= 1
        if not held:
            del self.by_address[address]
