"""How the store's writer saves one batch: one transaction, a bad row alone, the bounds.

Split from ``store.py`` because this is where the disk can fail and a node's
data can be refused: a batch is written in one transaction (node deletions
first, then node rows, last-seen times and vitals points); a row SQLite refuses
sends the batch row by row so only that row is repaired or refused and counted;
a failing database keeps the batch for a retry (at shutdown, for a few
seconds); every few hundred points a node is trimmed to its cap, and history
older than the window is pruned every :data:`PRUNE_INTERVAL`. ``Saving`` is a
mixin of ``Store``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rpicluster.master.database import (
    FORGET_NODE,
    FORGET_POINTS,
    POINT,
    ROW_ERRORS,
    SEEN,
    TRIM,
    UPSERT,
    repaired_row,
)
from rpicluster.master.writequeue import Batch

# The store's one logger (as before the split): its lines and tests name it.
log = logging.getLogger("rpicluster.master.store")

PRUNE_INTERVAL = 60.0  # seconds between two deletions of history older than the window
TRIM_EVERY = 512  # points inserted for a node between two checks of its cap


class Saving:
    """Saving batches for ``Store`` (a mixin: the attributes below are the store's)."""

    path: Path
    history_window: float
    points_cap: int
    write_errors: int
    repaired_total: int
    rejected_total: int
    _conn: sqlite3.Connection
    _cond: threading.Condition
    _error: Optional[str]
    _last_prune: float
    _pruned_all: bool
    _since_trim: dict[str, int]

    if TYPE_CHECKING:  # the store's own, called when a final batch is lost

        def _dropped(self, count: int, why: str) -> None: ...

    def _save(self, batch: Batch, final: bool = False) -> bool:
        """Write ``batch`` in one transaction (pruning when due); False if the database failed.

        ``final`` (shutdown): retry for a few seconds, then count what is lost.
        """
        deadline = time.monotonic() + 3.0
        delay = 0.1
        while True:
            try:
                self._transaction(batch, final)
            except sqlite3.Error as exc:  # the database, not a row: keep the batch, retry
                message = str(exc)[:200]
                with self._cond:  # health() sees the count and the error together
                    self.write_errors += 1
                    first = self._error != message
                    self._error = message
                if first:
                    log.error(
                        "%s: write failed, %d rows and %d points kept for a retry: %s",
                        self.path,
                        batch.rows(),
                        len(batch.points),
                        message,
                    )
                if final and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay *= 2
                    continue
                if final:
                    self._dropped(len(batch.points), "the database failed at shutdown")
                    log.error("%s: %d node rows not saved at shutdown", self.path, batch.rows())
                return False
            with self._cond:
                if self._error is not None:
                    log.warning("%s: writes succeed again", self.path)
                self._error = None
            return True

    def _transaction(self, batch: Batch, prune: bool) -> None:
        conn = self._conn
        now = time.time()
        prune = prune or now - self._last_prune >= PRUNE_INTERVAL
        if not batch.has_writes() and not prune:
            return
        inserted: collections.Counter[str] = collections.Counter(p[0] for p in batch.points)
        repaired = rejected = 0
        conn.execute("BEGIN")
        try:
            forgets = [(node_id,) for node_id in batch.forgets]
            groups = [
                (FORGET_NODE, forgets),
                (FORGET_POINTS, forgets),
                (UPSERT, list(batch.nodes.values())),
                (SEEN, list(batch.seen.values())),
                (POINT, list(batch.points)),
            ]
            try:
                for sql, rows in groups:
                    if rows:
                        conn.executemany(sql, rows)
            except ROW_ERRORS:
                # One row is to blame: start over, row by row, so only it is left out.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN")
                repaired, rejected = self._row_by_row(groups)
            trimmed = self._trim(inserted)
            if prune:
                self._prune(now - self.history_window)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        if prune:
            self._last_prune = now
            self._pruned_all = True
        since_trim = self._since_trim
        for node_id in batch.forgets:
            since_trim.pop(node_id, None)
        for node_id, count in inserted.items():
            if node_id in trimmed:
                since_trim[node_id] = 0
            elif node_id in since_trim:
                since_trim[node_id] += count
            # else: an id SQLite refuses, never trimmed (nor known to the prune)
        self.repaired_total += repaired
        self.rejected_total += rejected

    def _row_by_row(self, groups: list[tuple[str, list[tuple[Any, ...]]]]) -> tuple[int, int]:
        """Write each row alone; repair or refuse the ones SQLite refuses. Returns the counts."""
        conn = self._conn
        repaired = rejected = 0
        first: Optional[str] = None
        for sql, rows in groups:
            for row in rows:
                try:
                    conn.execute(sql, row)
                    continue
                except ROW_ERRORS as exc:
                    error: Exception = exc
                fixed = repaired_row(row)
                if fixed != row:
                    try:
                        conn.execute(sql, fixed)
                        repaired += 1
                        continue
                    except ROW_ERRORS as exc:
                        error = exc
                rejected += 1
                if first is None:
                    first = f"{type(error).__name__}: {str(error)[:120]}"
        if repaired or rejected:
            log.warning(
                "%s: %d rows repaired (invalid UTF-8 replaced), %d refused%s",
                self.path,
                repaired,
                rejected,
                f" (first: {first})" if first else "",
            )
        return repaired, rejected

    def _trim(self, inserted: collections.Counter[str]) -> set[str]:
        """Cap the points of nodes that got :data:`TRIM_EVERY` since their last check.

        A node not checked since the start is checked at its first points, so
        no node ever holds more than :attr:`points_cap` points after a commit.
        """
        keep = self.points_cap - TRIM_EVERY
        since_trim = self._since_trim
        trimmed = set()
        for node_id, count in inserted.items():
            if since_trim.get(node_id, TRIM_EVERY) + count >= TRIM_EVERY:
                with contextlib.suppress(*ROW_ERRORS):  # an id SQLite refuses has no points
                    self._conn.execute(TRIM, (node_id, keep))
                    trimmed.add(node_id)
        return trimmed

    def _prune(self, cutoff: float) -> None:
        """Delete points older than ``cutoff``.

        The first prune after the start scans the whole table; later ones walk
        the index range of each known node (a row in ``nodes``, or points since
        the start), a fraction of a full scan's cost with thousands of nodes.
        """
        conn = self._conn
        if not self._pruned_all:
            conn.execute("DELETE FROM vitals WHERE ts < ?", (cutoff,))
            return
        node_ids = {row[0] for row in conn.execute("SELECT node_id FROM nodes")}
        node_ids.update(self._since_trim)
        conn.executemany(
            "DELETE FROM vitals WHERE node_id = ? AND ts < ?",
            [(node_id, cutoff) for node_id in node_ids],
        )
