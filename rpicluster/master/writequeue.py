"""The store's write queue: writes handed over by the event loop and not yet saved.

Split from ``store.py`` because bounding the queue is a job of its own: node
rows and last-seen times coalesce by node id, vitals points are capped in number
and bytes (the oldest dropped), a batch is taken for one transaction at most
(:data:`TXN_POINTS`, :data:`TXN_BYTES`, so the WAL stays bounded), and a batch
that failed goes back in front without bringing back a node forgotten meanwhile.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any, Callable, Optional

# Vitals points waiting for the writer at most (about 2 s of 10,000 nodes at one
# report a second, 20 s at the default 5 s interval); the oldest are dropped beyond.
QUEUE_POINTS = 20_000
QUEUE_BYTES = 16 * 1024 * 1024  # bytes of vitals JSON waiting at most; the oldest dropped beyond
# Vitals points and bytes of them written in one transaction at most: the WAL
# holds one transaction however far it is past its checkpoint threshold.
TXN_POINTS = 2000
TXN_BYTES = 1024 * 1024
# (Store._work reads TXN_POINTS and TXN_BYTES too, imported by name: a test that
# changes them for the writer thread patches rpicluster.master.store as well.)

Read = tuple[Callable[[sqlite3.Connection], Any], Callable[[Any], None]]


class Batch:
    """Writes handed over and not yet saved: the writer's queue, bounded.

    Node rows and last-seen times are keyed by node id (a later row replaces an
    earlier one, as the upsert would), so they never exceed the number of known
    nodes; vitals points are bounded by :data:`QUEUE_POINTS` and :data:`QUEUE_BYTES`.
    """

    def __init__(self) -> None:
        self.nodes: dict[Any, tuple[Any, ...]] = {}
        self.seen: dict[Any, tuple[Optional[float], Any]] = {}
        self.points: collections.deque[tuple[str, float, str]] = collections.deque()
        self.point_bytes = 0
        self.reads: collections.deque[Read] = collections.deque()
        # Node ids to delete, applied before this batch's rows: the forget came
        # after any of its rows still queued (those are discarded) and before these.
        self.forgets: set[str] = set()
        self.since: Optional[float] = None  # monotonic time the oldest write was handed over

    def has_writes(self) -> bool:
        return bool(self.nodes or self.seen or self.points or self.forgets)

    def rows(self) -> int:
        return len(self.nodes) + len(self.seen) + len(self.forgets)

    def forget(self, node_id: str) -> None:
        """Delete the node later; drop its rows and points queued before now."""
        self.nodes.pop(node_id, None)
        self.seen.pop(node_id, None)
        if any(point[0] == node_id for point in self.points):
            kept = [point for point in self.points if point[0] != node_id]
            self.point_bytes = sum(len(point[2]) for point in kept)
            self.points = collections.deque(kept)
        self.forgets.add(node_id)

    def add_points(self, points: list[tuple[str, float, str]], front: bool = False) -> int:
        """Queue ``points`` (before the queued ones if ``front``); return how many were dropped."""
        if front:
            self.points.extendleft(reversed(points))
        else:
            self.points.extend(points)
        self.point_bytes += sum(len(point[2]) for point in points)
        dropped = 0
        while self.points and (len(self.points) > QUEUE_POINTS or self.point_bytes > QUEUE_BYTES):
            self.point_bytes -= len(self.points.popleft()[2])
            dropped += 1
        return dropped

    def take_oldest(self) -> Batch:
        """The rows and the oldest points, within :data:`TXN_POINTS` and :data:`TXN_BYTES`.

        Reads stay: they run after the last points queued before them.
        """
        taken = Batch()
        taken.nodes, self.nodes = self.nodes, {}
        taken.seen, self.seen = self.seen, {}
        taken.forgets, self.forgets = self.forgets, set()
        taken.since = self.since  # the rest is as old, as far as lag is concerned
        points = self.points
        while points and len(taken.points) < TXN_POINTS and taken.point_bytes < TXN_BYTES:
            point = points.popleft()
            taken.points.append(point)
            taken.point_bytes += len(point[2])
        self.point_bytes -= taken.point_bytes
        return taken

    def put_back(self, older: Batch) -> int:
        """Requeue ``older`` (a batch that failed) before this one; return points dropped."""
        gone = self.forgets  # forgotten since ``older`` was taken: its rows must not return
        self.nodes = {**{k: v for k, v in older.nodes.items() if k not in gone}, **self.nodes}
        self.seen = {**{k: v for k, v in older.seen.items() if k not in gone}, **self.seen}
        self.forgets = older.forgets | gone
        if gone:
            older.points = collections.deque(p for p in older.points if p[0] not in gone)
        if older.since is not None:
            self.since = older.since if self.since is None else min(older.since, self.since)
        return self.add_points(list(older.points), front=True)
