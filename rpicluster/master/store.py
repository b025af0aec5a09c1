"""SQLite persistence of the registry and of the vitals history.

The database is ``state_dir/rpicluster.db`` in WAL mode. One writer thread owns
the connection and is fed by a bounded in-memory queue: the event loop only
hands over rows (never blocking, never waiting on the disk), so a slow SD card
never stalls heartbeats. Reads for the ``history`` query go through the same
writer, after every write handed over before them, and their answer comes back
to the loop through a callback.

The store must not die silently (issue 7):

- one row SQLite refuses (a lone surrogate in a hostname, an oversized
  integer) is retried alone, repaired or refused and counted; the rest of its
  batch is saved, and the writer thread keeps running;
- a failing database (read-only, full or broken disk) keeps the rows queued and
  retries with backoff; :meth:`Store.health` says so (the ``store`` object of
  the master dict, so ``rpicluster status`` and ``/healthz`` can show it);
- the queue is bounded: node rows are coalesced by node id (they are
  idempotent upserts), vitals points beyond :data:`QUEUE_POINTS` or
  :data:`QUEUE_BYTES` drop the oldest ones, counted in ``dropped_total``;
- history reads are refused at once (the caller answers ``internal``) when the
  writer is not running or too many are waiting, so they never hang;
- shutdown writes everything queued, even when a history reply can no longer be
  handed to a closed event loop.

The file is bounded too: history older than ``history_window`` is pruned every
:data:`PRUNE_INTERVAL`, each node keeps at most :func:`points_cap` points (a
second bound, whatever timestamps a node sends), and the WAL file is truncated
to :data:`JOURNAL_SIZE_LIMIT` after each checkpoint.

The work is shared by four modules: this one is the store's API and its
writer thread; ``writequeue.py`` bounds what waits, ``saving.py`` writes one
batch, ``database.py`` is the file itself (schema, statements, row repair).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from rpicluster.master.database import DB_NAME, connect
from rpicluster.master.saving import Saving
from rpicluster.master.writequeue import QUEUE_BYTES, QUEUE_POINTS, TXN_BYTES, TXN_POINTS, Batch

log = logging.getLogger(__name__)

PENDING_READS = 64  # history reads waiting at most; more are refused at once
# Points kept per node at least; the cap is max(this, history_window in seconds),
# i.e. one point a second on average over the window.
POINTS_PER_NODE = 4096
LAG_LIMIT = 30.0  # seconds a write may wait unsaved before health says the store lags
RETRY_MIN = 0.5  # seconds before the first retry of a failed write
RETRY_MAX = 30.0  # seconds between two retries at most (doubling from RETRY_MIN)
DROP_LOG_INTERVAL = 60.0  # seconds between two log lines about dropped points at least


class StoreError(Exception):
    """The database cannot be opened or read; the message names the file."""


def points_cap(history_window: float) -> int:
    """Vitals points kept per node at most: one a second over the window, 4,096 at least."""
    return max(POINTS_PER_NODE, int(history_window))


class Store(Saving):
    """The master's database; :meth:`load_nodes` at start, then queued writes."""

    def __init__(self, state_dir: str, history_window: float) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.history_window = history_window
        self.points_cap = points_cap(history_window)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the master database: {exc}") from None
        self._cond = threading.Condition()
        self._pending = Batch()
        self._inflight_since: Optional[float] = None  # the batch being written, if any
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._closed = False
        self._dead = False  # the writer thread ended (or never ran): reads are refused
        self._error: Optional[str] = None  # why the latest write failed; None once one succeeds
        self._last_prune = 0.0
        self._pruned_all = False  # whether a prune scanned the whole table since the start
        self._since_trim: dict[str, int] = {}  # points inserted per node since its cap was checked
        self._drop_logged_at = -DROP_LOG_INTERVAL
        self._dropped_at: Optional[float] = None  # monotonic time of the latest drop
        self.write_errors = 0  # failed write attempts (each retried)
        self.dropped_total = 0  # vitals points dropped from a full queue, or unsaved at exit
        self.rejected_total = 0  # rows SQLite refused even after repair (never stored)
        self.repaired_total = 0  # rows stored after their strings were made valid UTF-8

    # ------------------------------------------------------------- start/stop

    def load_nodes(self) -> list[dict[str, Any]]:
        """Every known node (before the writer starts), oldest registration first."""
        try:
            rows = self._conn.execute(
                "SELECT node_id, hostname, address, roles, state, last_seen, details, vitals,"
                " action_errors FROM nodes ORDER BY rowid"
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the nodes table: {exc}") from None
        nodes = []
        for row in rows:
            try:
                nodes.append(
                    {
                        "node_id": row[0],
                        "hostname": row[1],
                        "address": row[2],
                        "roles": json.loads(row[3]),
                        "state": row[4],
                        "last_seen": row[5],
                        "details": json.loads(row[6]),
                        "vitals": None if row[7] is None else json.loads(row[7]),
                        "action_errors": json.loads(row[8]),
                    }
                )
            except (ValueError, TypeError, RecursionError):
                # Not JSON, not text, or nested deeper than the decoder goes.
                log.warning("%s: skipping node %r with a corrupt row", self.path, row[0])
        return nodes

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rpicluster-store", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Apply everything queued (and answer queued reads), close the database; idempotent."""
        with self._cond:
            if self._closed:
                return
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("%s: writer did not finish within %g s", self.path, timeout)
                return
            self._thread = None
        # The writer is gone (finished, crashed or never started): whatever is
        # still queued is written here, so a final batch is never lost silently.
        with self._cond:
            batch, self._pending = self._pending, Batch()
            self._dead = True
        if batch.has_writes() or batch.reads:
            self._save(batch, final=True)
            self._answer(batch.reads)
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._closed = True

    # ---------------------------------------------------------------- writes

    def save_nodes(self, rows: list[tuple[Any, ...]]) -> None:
        """Queue node rows (upserts, keyed by their node id); never blocks."""
        if rows:
            with self._cond:
                nodes = self._pending.nodes
                for row in rows:
                    nodes[row[0]] = row
                self._handed_over()

    def save_last_seen(self, rows: list[tuple[Optional[float], str]]) -> None:
        """Queue ``(last_seen, node_id)`` updates (keyed by node id); never blocks."""
        if rows:
            with self._cond:
                seen = self._pending.seen
                for row in rows:
                    seen[row[1]] = row
                self._handed_over()

    def add_vitals(self, points: list[tuple[str, float, str]]) -> None:
        """Queue history points ``(node_id, ts, json)``; a full queue drops its oldest."""
        if points:
            with self._cond:
                dropped = self._pending.add_points(points)
                if dropped:
                    self._dropped(dropped, "the write queue is full")
                self._handed_over()

    def forget(self, node_id: str) -> None:
        """Queue the deletion of a node's row and history; never blocks."""
        with self._cond:
            self._pending.forget(node_id)
            self._handed_over()
        log.info("%s: node %s and its history queued for deletion", self.path, node_id)

    def _handed_over(self) -> None:
        if self._pending.since is None:
            self._pending.since = time.monotonic()
        self._cond.notify()

    def _dropped(self, count: int, why: str) -> None:
        self.dropped_total += count
        # A full queue drops on every flush: one line a minute at most, the counter says the rest.
        now = self._dropped_at = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            self._drop_logged_at = now
            log.error(
                "%s: %d vitals points dropped (%d in all): %s",
                self.path,
                count,
                self.dropped_total,
                why,
            )

    def read(self, fn: Callable[[sqlite3.Connection], Any], done: Callable[[Any], None]) -> None:
        """Run ``fn(conn)`` after every queued write; pass its result (or exception) to ``done``.

        ``done`` runs on the writer thread: hand the result to the loop with
        ``call_soon_threadsafe``. When the writer is not running, is stopping or
        has :data:`PENDING_READS` reads waiting, ``done`` gets a :class:`StoreError`
        at once, on the caller's thread.
        """
        with self._cond:
            thread = self._thread
            if self._dead or thread is None or not thread.is_alive():
                refused = "the database writer is not running"
            elif self._stopping:
                refused = "the master is stopping"
            elif len(self._pending.reads) >= PENDING_READS:
                refused = f"{PENDING_READS} database reads are already waiting"
            else:
                self._pending.reads.append((fn, done))
                self._cond.notify()
                return
        done(StoreError(f"{self.path}: {refused}"))

    # ---------------------------------------------------------------- health

    def health(self) -> dict[str, Any]:
        """The ``store`` object of the master dict (docs/protocol.md section 8.3)."""
        with self._cond:
            now = time.monotonic()
            starts = [t for t in (self._pending.since, self._inflight_since) if t is not None]
            lag = now - min(starts) if starts else 0.0
            thread = self._thread
            error = self._error
            if self._dead or thread is None or not thread.is_alive():
                error = "the database writer is not running"
            elif error is None and lag > LAG_LIMIT:
                error = f"writes are {lag:.0f} s behind"
            elif (
                error is None
                and self._dropped_at is not None
                and now - self._dropped_at < LAG_LIMIT
            ):
                # Dropping the oldest hides the lag: the disk does not keep up either way.
                error = f"vitals points dropped in the last {LAG_LIMIT:g} s (write queue full)"
            return {
                "ok": error is None,
                "error": error,
                "queue": len(self._pending.points),
                "queue_limit": QUEUE_POINTS,
                "queue_bytes": self._pending.point_bytes,
                "queue_bytes_limit": QUEUE_BYTES,
                "pending_rows": self._pending.rows(),
                "lag_seconds": round(lag, 3),
                "dropped_total": self.dropped_total,
                "rejected_total": self.rejected_total,
                "write_errors_total": self.write_errors,
            }

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # not an Exception: say so, then let it end the thread
            log.critical("%s: database writer stopped: %r", self.path, exc)
            raise
        finally:
            with self._cond:
                self._dead = True
                reads, self._pending.reads = self._pending.reads, collections.deque()
            failure = StoreError(f"{self.path}: the database writer stopped")
            for _, done in reads:
                with contextlib.suppress(Exception):
                    done(failure)

    def _work(self) -> None:
        retry = 0.0  # seconds between the latest failed write and the next try, 0 when none failed
        retry_at = 0.0  # monotonic time of the next try
        while True:
            with self._cond:
                if retry:  # back off, but answer reads (and stop) meanwhile
                    self._cond.wait_for(
                        lambda: self._pending.reads or self._stopping,
                        max(0.0, retry_at - time.monotonic()),
                    )
                else:
                    self._cond.wait_for(
                        lambda: self._pending.has_writes() or self._pending.reads or self._stopping
                    )
                stopping = self._stopping
                if retry and not stopping and time.monotonic() < retry_at:
                    reads, self._pending.reads = self._pending.reads, collections.deque()
                    batch = None  # reads only: the database failed a moment ago
                else:
                    pending = self._pending
                    if len(pending.points) > TXN_POINTS or pending.point_bytes > TXN_BYTES:
                        batch = pending.take_oldest()  # the rest comes next round
                    else:
                        batch, self._pending = pending, Batch()
                    reads = batch.reads
                    self._inflight_since = batch.since
            if batch is not None:
                try:
                    saved = self._save(batch, final=stopping)
                except Exception as exc:  # a bug, not the data: keep the writer alive regardless
                    log.exception("%s: unexpected failure writing a batch", self.path)
                    with self._cond:
                        self._error = f"unexpected failure: {exc!r}"[:200]
                    saved = False
                with self._cond:
                    self._inflight_since = None
                    if not saved and not stopping:
                        dropped = self._pending.put_back(batch)
                        if dropped:
                            self._dropped(dropped, "the write queue is full")
                retry = 0.0 if saved else min(RETRY_MAX, max(RETRY_MIN, retry * 2))
                retry_at = time.monotonic() + retry
            self._answer(reads)
            if stopping:
                with self._cond:
                    more = self._pending.has_writes() or self._pending.reads
                if not more or batch is None or not saved:  # close() saves what is left
                    return

    def _answer(self, reads: Any) -> None:
        """Run queued reads and hand each result over; a failing hand-over harms nothing."""
        for fn, done in reads:
            try:
                result = fn(self._conn)
            except Exception as exc:  # handed to the caller, who answers the peer
                result = exc
            try:
                done(result)
            except Exception as exc:  # e.g. RuntimeError: the event loop already closed
                log.warning("%s: a read result could not be handed over: %r", self.path, exc)
