"""The master's registry of nodes and its state machine.

A node is keyed by its persistent ``node_id``; every role thread of a slave has its
own connection, so a node holds one :class:`Session` per role. A node is as alive as
its best session: ``alive`` when heard from within ``suspect_after``, ``suspect``
after that, ``dead`` after ``dead_after`` of silence or when its last connection
closed without ``goodbye``, ``left`` after a ``goodbye`` on its last connection.

The registry is driven from the master's event loop only (no locks). Liveness uses
a monotonic clock so a Pi without a real-time clock jumping at boot (NTP) cannot
kill the fleet; wall-clock times are derived from it for reporting. Both clocks are
injectable so the state machine is tested without sleeping.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Optional

from rpicluster import memberdata as md

log = logging.getLogger("rpicluster.master")

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)
MAX_ROLES = 32  # roles a node may hold at once (docs/protocol.md "Limits")
# A copied SD card: after refusing a hello with ``duplicate_id`` the node stays
# flagged this long. The refused slave asks again every 60 s (slave.py), so the
# flag holds steadily while the copy runs and clears a few minutes after it stops.
DUPLICATE_ID_HOLD = 180.0
DUPLICATE_ID_LOG_EVERY = 600.0  # seconds between two log lines about one node's copy


class Session:
    """One authenticated slave connection: a (node_id, role) pair."""

    __slots__ = ("node", "role", "address", "conn", "seen", "connected_at")

    def __init__(self, node: Node, role: str, address: str, conn: Any, now: float) -> None:
        self.node = node
        self.role = role
        self.address = address
        self.conn = conn  # the server's connection object; has close(reason)
        self.seen = now  # monotonic time of the last message
        self.connected_at = now


class Node:
    """What the master knows about one Pi."""

    __slots__ = (
        "node_id",
        "hostname",
        "address",
        "roles",
        "state",
        "seen",
        "connected_at",
        "details",
        "vitals",
        "action_errors",
        "sessions",
        "grace_until",
        "rates",
        "name",
        "groups",
        "instance",
        "dup_until",
        "dup_address",
        "dup_logged_at",
    )

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.hostname = ""
        self.name = ""  # details.node_name, else the hostname (kept in Registry.by_name)
        self.groups: list[str] = []
        self.instance: Optional[str] = None  # the hello's instance token of its connections
        self.dup_until: Optional[float] = None  # monotonic end of the duplicate_id flag
        self.dup_address = ""  # where the refused copy connected from
        self.dup_logged_at: Optional[float] = None
        self.address = ""
        self.roles: list[str] = []
        self.state = DEAD
        self.seen: Optional[float] = None  # monotonic time last heard from
        self.connected_at: Optional[float] = None  # monotonic start of this connection spell
        self.details: dict[str, Any] = {}
        self.vitals: Optional[dict[str, Any]] = None
        self.action_errors: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, Session] = {}  # role -> session
        self.grace_until: Optional[float] = None  # loaded from disk, not yet reconnected
        self.rates: dict[str, list[float]] = {}  # role -> vitals token bucket [tokens, at]


class Registry:
    """Nodes, their sessions and states; see the module docstring for the rules.

    ``clock`` is monotonic seconds, ``wall`` epoch seconds. Mutating methods are
    called from one thread (the master's event loop). ``dirty`` collects node ids
    whose stored row changed; ``pending_vitals`` the history points not yet stored.
    """

    def __init__(
        self,
        suspect_after: float,
        dead_after: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.clock = clock
        self.wall = wall
        self.nodes: dict[str, Node] = {}
        self.by_name: dict[str, set[str]] = {}  # name -> ids of the nodes so named
        self.watch: set[Node] = set()  # nodes that are alive or suspect
        self.dirty: set[str] = set()
        # Node ids whose state or vitals changed since the alert rules last looked
        # (alerts.py), so they look at the changes, not the whole fleet each second.
        self.changed: set[str] = set()
        self.pending_vitals: list[tuple[str, float, str]] = []
        self._offset = 0.0
        self.started = clock()  # stands in for the last-seen time of a node loaded without one
        self.sync_clock()

    # ----------------------------------------------------------------- clocks

    def sync_clock(self) -> None:
        """Re-derive wall time from monotonic time (called by every sweep)."""
        self._offset = self.wall() - self.clock()

    def to_wall(self, mono: Optional[float]) -> Optional[float]:
        return None if mono is None else round(mono + self._offset, 3)

    # ------------------------------------------------------------ transitions

    def _set_state(self, node: Node, state: str) -> None:
        if node.state != state:
            node.state = state
            self.dirty.add(node.node_id)
            self.changed.add(node.node_id)
        if state in (ALIVE, SUSPECT):
            self.watch.add(node)
        else:
            self.watch.discard(node)

    def _identify(self, node: Node) -> None:
        """Set the node's hostname, name and groups from its details; keep by_name in step.

        The name is what the fleet calls the node (``[slave] node_name``, the
        inventory hostname), else its OS hostname. Several node ids may share a
        name (identical cards, a re-flashed Pi): all are kept and flagged, never merged.
        """
        details = node.details
        hostname = details.get("hostname")
        node.hostname = hostname if isinstance(hostname, str) and hostname else node.address
        name = details.get("node_name")
        name = name if isinstance(name, str) and name else node.hostname
        groups = details.get("groups")
        node.groups = [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []
        if name == node.name and node.node_id in self.by_name.get(name, ()):
            return
        self._unname(node)
        node.name = name
        self.by_name.setdefault(name, set()).add(node.node_id)

    def _unname(self, node: Node) -> None:
        ids = self.by_name.get(node.name)
        if ids is not None:
            ids.discard(node.node_id)
            if not ids:
                del self.by_name[node.name]

    def holder(self, node_id: str, instance: Optional[str]) -> Optional[Node]:
        """The node when another live process holds ``node_id``: a copied card.

        Another process: both sent an ``instance`` token and they differ. Live:
        connected and heard from within ``suspect_after``. A Pi that restarted
        or rebooted is not live any more (its old connection closed or went
        silent), so it takes its id back; a slave without a token never conflicts.
        """
        node = self.nodes.get(node_id)
        if node is None or not node.sessions or instance is None or node.instance is None:
            return None
        if node.instance == instance or node.seen is None:
            return None
        return node if node.seen >= self.clock() - self.suspect_after else None

    def flag_duplicate_id(self, node: Node, address: str) -> bool:
        """Flag the node for DUPLICATE_ID_HOLD; True when a log line is due (rate-limited)."""
        now = self.clock()
        node.dup_until = now + DUPLICATE_ID_HOLD
        node.dup_address = address
        if node.dup_logged_at is None or now - node.dup_logged_at >= DUPLICATE_ID_LOG_EVERY:
            node.dup_logged_at = now
            return True
        return False

    def duplicate_id(self, node: Node) -> bool:
        return node.dup_until is not None and self.clock() < node.dup_until

    def register(
        self,
        node_id: str,
        role: str,
        address: str,
        details: dict[str, Any],
        conn: Any,
        instance: Optional[str] = None,
    ) -> tuple[Session, Optional[Session]]:
        """A slave session authenticated. Returns it and the session it replaces, if any.

        The caller closes the replaced session's connection (error ``replaced``);
        it is detached here so its closing changes nothing. The caller has asked
        :meth:`holder` first: a live node of another instance is refused, not replaced.
        """
        now = self.clock()
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = Node(node_id)
        old = node.sessions.pop(role, None)
        if not node.sessions:
            node.connected_at = now
            node.roles = []
        if role not in node.roles:
            node.roles.append(role)
        session = Session(node, role, address, conn, now)
        node.sessions[role] = session
        node.address = address
        if details:
            node.details = details
        node.instance = instance
        self._identify(node)
        node.seen = now
        node.grace_until = None
        self.changed.add(node_id)  # details (its name) may have changed
        self._set_state(node, ALIVE)
        self.dirty.add(node_id)
        return session, old

    def heard(self, session: Session) -> None:
        """Any message on a session: the hot path, keep it tiny."""
        now = self.clock()
        session.seen = now
        node = session.node
        node.seen = now
        if node.state != ALIVE:
            self._set_state(node, ALIVE)

    def vitals(self, session: Session, vitals: dict[str, Any]) -> None:
        """Latest vitals of the node, and one history point (``ts`` added if missing)."""
        ts = vitals.get("ts")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            vitals["ts"] = ts = round(self.clock() + self._offset, 3)
        node = session.node
        node.vitals = vitals
        self.changed.add(node.node_id)
        self.pending_vitals.append((node.node_id, float(ts), json.dumps(vitals)))
        self.dirty.add(node.node_id)

    def action_error(self, session: Session, error: str, count: int) -> None:
        entry = session.node.action_errors.setdefault(session.role, {"count": 0, "last": ""})
        entry["count"] = count
        entry["last"] = error
        self.dirty.add(session.node.node_id)

    def disconnect(self, session: Session, goodbye: bool) -> bool:
        """A session ended. Returns True when it was still attached (not replaced/swept)."""
        node = session.node
        if node.sessions.get(session.role) is not session:
            return False
        del node.sessions[session.role]
        if not node.sessions:
            node.connected_at = None
            self._set_state(node, LEFT if goodbye else DEAD)
            self.dirty.add(node.node_id)
        return True

    def sweep(self, grace: float = 0.0) -> list[Session]:
        """Move silent nodes to suspect/dead; return the sessions to close.

        Cheap enough to run several times a second with 10,000 nodes: it looks
        only at nodes that are alive or suspect. ``grace`` is how late the caller
        runs: when the master's own loop lagged, messages it read early in that
        long iteration look older than they are, and must not kill their nodes.
        """
        self.sync_clock()
        now = self.clock() - max(0.0, grace)
        suspect_before = now - self.suspect_after
        dead_before = now - self.dead_after
        to_close: list[Session] = []
        for node in list(self.watch):
            if not node.sessions:
                # Loaded from disk: keep its state for a grace period while it reconnects.
                if node.grace_until is None or now >= node.grace_until:
                    self._set_state(node, DEAD)
                continue
            seen = node.seen
            if seen < dead_before:
                to_close.extend(node.sessions.values())
                node.sessions.clear()
                node.connected_at = None
                self._set_state(node, DEAD)
                continue
            if seen < suspect_before and node.state == ALIVE:
                self._set_state(node, SUSPECT)
            if len(node.sessions) > 1:
                for role, session in list(node.sessions.items()):
                    if session.seen < dead_before:  # one role thread went silent
                        del node.sessions[role]
                        to_close.append(session)
        return to_close

    # -------------------------------------------------------------- forgetting

    def find(self, wanted: str) -> list[Node]:
        """The nodes ``wanted`` names: its node id first, else every node of that name.

        A node's name is its ``node_name``, else its hostname. Two Pis may share
        a name; the caller refuses an ambiguous one.
        """
        node = self.nodes.get(wanted)
        if node is not None:
            return [node]
        return [self.nodes[i] for i in sorted(self.by_name.get(wanted, ())) if i in self.nodes]

    def forget(self, node_id: str) -> list[Session]:
        """Remove a node and its pending history; return its sessions for the caller to close.

        The sessions are detached first, so their closing changes nothing here.
        """
        node = self.nodes.pop(node_id, None)
        if node is None:
            return []
        self._unname(node)
        sessions = list(node.sessions.values())
        node.sessions.clear()
        self.watch.discard(node)
        self.dirty.discard(node_id)
        self.changed.add(node_id)
        if any(point[0] == node_id for point in self.pending_vitals):
            self.pending_vitals = [pt for pt in self.pending_vitals if pt[0] != node_id]
        return sessions

    def stale(self, forget_after: float) -> list[str]:
        """Ids of nodes not connected and not heard from for ``forget_after`` seconds.

        A node loaded without a last-seen time counts from the registry's start,
        so an old database's nodes are forgotten too, never at once.
        """
        if forget_after <= 0:
            return []
        before = self.clock() - forget_after
        return [
            node.node_id
            for node in self.nodes.values()
            if not node.sessions
            and node.state in (DEAD, LEFT)
            and (node.seen if node.seen is not None else self.started) < before
        ]

    # ----------------------------------------------------------- persistence

    def load(self, rows: list[dict[str, Any]]) -> None:
        """Nodes read from the store at start: not connected, state kept for a grace period.

        Rows are cleaned to today's member-data limits (an older master stored
        whatever a member sent): a bad value is dropped, a row without a valid
        node id is skipped, and loading never fails on content.
        """
        now = self.clock()
        skipped = 0
        for row in rows:
            try:
                node = _node_from_row(row)
            except Exception as exc:  # any shape at all: skip the row, keep the master up
                log.debug("stored node row skipped: %r", exc)
                node = None
            if node is None:
                skipped += 1
                continue
            last_seen = row.get("last_seen")
            finite = isinstance(last_seen, (int, float)) and not isinstance(last_seen, bool)
            if finite and math.isfinite(last_seen):
                node.seen = last_seen - self._offset
            if node.state in (ALIVE, SUSPECT):
                node.grace_until = now + self.dead_after
                self.watch.add(node)
            old = self.nodes.get(node.node_id)
            if old is not None:
                self._unname(old)
            self.nodes[node.node_id] = node
            self._identify(node)
        if skipped:
            log.warning("%d stored nodes skipped: no valid node id", skipped)

    def row(self, node: Node) -> tuple[Any, ...]:
        """The node as a ``nodes`` table row (see store.py)."""
        return (
            node.node_id,
            node.hostname,
            node.address,
            json.dumps(node.roles),
            node.state,
            self.to_wall(node.seen),
            json.dumps(node.details),
            None if node.vitals is None else json.dumps(node.vitals),
            json.dumps(node.action_errors),
        )

    def take_dirty_rows(self) -> list[tuple[Any, ...]]:
        rows = [self.row(self.nodes[nid]) for nid in self.dirty if nid in self.nodes]
        self.dirty.clear()
        return rows

    def take_vitals(self) -> list[tuple[str, float, str]]:
        points, self.pending_vitals = self.pending_vitals, []
        return points

    def last_seen_rows(self) -> list[tuple[Optional[float], str]]:
        """(last_seen, node_id) of connected nodes: heartbeats are stored in batches."""
        return [(self.to_wall(node.seen), node.node_id) for node in self.watch if node.sessions]

    # ------------------------------------------------------------------ views

    def node_dict(self, node: Node) -> dict[str, Any]:
        """The node as documented in docs/protocol.md (``query`` what=node)."""
        doc = {
            "node_id": node.node_id,
            "name": node.name or node.hostname,
            "groups": list(node.groups),
            "duplicate_name": len(self.by_name.get(node.name, ())) > 1,
            "duplicate_id": self.duplicate_id(node),
            "hostname": node.hostname,
            "address": node.address,
            "roles": list(node.roles),
            "state": node.state,
            "connected": bool(node.sessions),
            "last_seen": self.to_wall(node.seen),
            "connected_since": self.to_wall(node.connected_at),
            "details": node.details,
            "vitals": node.vitals,
            "action_errors": node.action_errors,
        }
        if doc["duplicate_id"]:
            doc["duplicate_id_address"] = node.dup_address
        record = node.details.get("tls")
        if isinstance(record, dict):  # bound to a certificate (docs/protocol.md 13)
            not_after = record.get("not_after")
            days = None
            if isinstance(not_after, (int, float)) and not isinstance(not_after, bool):
                days = round((not_after - self.wall()) / 86400.0, 1)
            doc["tls"] = {"name": record.get("name"), "not_after": not_after, "days_left": days}
        return doc

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for node in self.nodes.values():
            counts[node.state] += 1
        return counts


def node_label(node: Node) -> str:
    """A node's name: ``node_name`` of its details, else its hostname."""
    return node.name or node.hostname


def _node_from_row(row: dict[str, Any]) -> Optional[Node]:
    """A node from a stored row, cleaned to the limits; None without a valid node id."""
    node_id = row.get("node_id")
    if md.check_name(node_id, md.MAX_NODE_ID):
        return None
    node = Node(node_id)
    node.address = row.get("address") if isinstance(row.get("address"), str) else ""
    if not md.printable(node.address) or len(node.address) > md.MAX_STRING:
        node.address = ""
    roles = row.get("roles")
    if isinstance(roles, list):
        node.roles = [r for r in roles if not md.check_name(r, md.MAX_ROLE)][:MAX_ROLES]
    node.details = md.clean_details(row.get("details"))
    node.vitals = md.clean_vitals(row.get("vitals"))
    node.action_errors = md.clean_action_errors(row.get("action_errors"))
    state = row.get("state")
    node.state = state if state in STATES else DEAD
    return node
