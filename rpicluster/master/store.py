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
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

DB_NAME = "rpicluster.db"
PRUNE_INTERVAL = 60.0  # seconds between two deletions of history older than the window
# Vitals points waiting for the writer at most (about 2 s of 10,000 nodes at one
# report a second, 20 s at the default 5 s interval); the oldest are dropped beyond.
QUEUE_POINTS = 20_000
QUEUE_BYTES = 16 * 1024 * 1024  # bytes of vitals JSON waiting at most; the oldest dropped beyond
# Vitals points and bytes of them written in one transaction at most: the WAL
# holds one transaction however far it is past its checkpoint threshold.
TXN_POINTS = 2000
TXN_BYTES = 1024 * 1024
PENDING_READS = 64  # history reads waiting at most; more are refused at once
# Points kept per node at least; the cap is max(this, history_window in seconds),
# i.e. one point a second on average over the window.
POINTS_PER_NODE = 4096
TRIM_EVERY = 512  # points inserted for a node between two checks of its cap
LAG_LIMIT = 30.0  # seconds a write may wait unsaved before health says the store lags
RETRY_MIN = 0.5  # seconds before the first retry of a failed write
RETRY_MAX = 30.0  # seconds between two retries at most (doubling from RETRY_MIN)
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint
WAL_AUTOCHECKPOINT = 1000  # pages (4 KiB each) of WAL that trigger a checkpoint
DROP_LOG_INTERVAL = 60.0  # seconds between two log lines about dropped points at least

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    address TEXT NOT NULL,
    roles TEXT NOT NULL,
    state TEXT NOT NULL,
    last_seen REAL,
    details TEXT NOT NULL,
    vitals TEXT,
    action_errors TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vitals (
    node_id TEXT NOT NULL,
    ts REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS vitals_by_node ON vitals (node_id, ts);
"""

_UPSERT = (
    "INSERT OR REPLACE INTO nodes (node_id, hostname, address, roles, state, last_seen,"
    " details, vitals, action_errors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SEEN = "UPDATE nodes SET last_seen = ? WHERE node_id = ?"
_POINT = "INSERT INTO vitals VALUES (?, ?, ?)"
# A forgotten node (``rpicluster forget``, ``forget_after``): its row and its history.
_FORGET_NODE = "DELETE FROM nodes WHERE node_id = ?"
_FORGET_POINTS = "DELETE FROM vitals WHERE node_id = ?"
# Keep a node's newest ``keep`` points (by ts); walks its index range from the newest.
_TRIM = (
    "DELETE FROM vitals WHERE rowid IN (SELECT rowid FROM vitals WHERE node_id = ?"
    " ORDER BY ts DESC LIMIT -1 OFFSET ?)"
)

# What one row (not the database) is to blame for: a string SQLite's UTF-8
# encoder refuses (UnicodeEncodeError is a ValueError), an integer out of
# SQLite's range, a value of the wrong type or a NOT NULL column left empty.
_ROW_ERRORS = (
    ValueError,
    OverflowError,
    TypeError,
    sqlite3.InterfaceError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
)

Read = tuple[Callable[[sqlite3.Connection], Any], Callable[[Any], None]]


class StoreError(Exception):
    """The database cannot be opened or read; the message names the file."""


def points_cap(history_window: float) -> int:
    """Vitals points kept per node at most: one a second over the window, 4,096 at least."""
    return max(POINTS_PER_NODE, int(history_window))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    # A database written by an older master (or damaged) may hold TEXT that is not
    # UTF-8: read it with U+FFFD rather than fail the whole query and the start.
    conn.text_factory = _text
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
    conn.executescript(_SCHEMA)
    return conn


def _repaired(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with each string SQLite cannot encode made valid (U+FFFD for a lone surrogate)."""
    return tuple(
        value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if isinstance(value, str) and not value.isascii()
        else value
        for value in row
    )


class _Batch:
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

    def take_oldest(self) -> _Batch:
        """The rows and the oldest points, within :data:`TXN_POINTS` and :data:`TXN_BYTES`.

        Reads stay: they run after the last points queued before them.
        """
        taken = _Batch()
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

    def put_back(self, older: _Batch) -> int:
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


class Store:
    """The master's database; :meth:`load_nodes` at start, then queued writes."""

    def __init__(self, state_dir: str, history_window: float) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.history_window = history_window
        self.points_cap = points_cap(history_window)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the master database: {exc}") from None
        self._cond = threading.Condition()
        self._pending = _Batch()
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
            batch, self._pending = self._pending, _Batch()
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
                        batch, self._pending = pending, _Batch()
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

    def _save(self, batch: _Batch, final: bool = False) -> bool:
        """Write ``batch`` in one transaction (pruning when due); False if the database failed.

        ``final`` (shutdown): retry for a few seconds, then count what is lost.
        """
        deadline = time.monotonic() + 3.0
        delay = 0.1
        while True:
            try:
                self._transaction(batch, final)
            except sqlite3.Error as exc:  # the database, not a row: keep the batch, retry
                self.write_errors += 1
                message = str(exc)[:200]
                with self._cond:
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

    def _transaction(self, batch: _Batch, prune: bool) -> None:
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
                (_FORGET_NODE, forgets),
                (_FORGET_POINTS, forgets),
                (_UPSERT, list(batch.nodes.values())),
                (_SEEN, list(batch.seen.values())),
                (_POINT, list(batch.points)),
            ]
            try:
                for sql, rows in groups:
                    if rows:
                        conn.executemany(sql, rows)
            except _ROW_ERRORS:
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
                except _ROW_ERRORS as exc:
                    error: Exception = exc
                fixed = _repaired(row)
                if fixed != row:
                    try:
                        conn.execute(sql, fixed)
                        repaired += 1
                        continue
                    except _ROW_ERRORS as exc:
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
                with contextlib.suppress(*_ROW_ERRORS):  # an id SQLite refuses has no points
                    self._conn.execute(_TRIM, (node_id, keep))
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


def read_history(
    conn: sqlite3.Connection, node_id: str, since: Optional[float], limit: int, budget: int
) -> tuple[str, bool]:
    """The points after ``since`` as a JSON array text, oldest first, and whether more exist.

    Rows are read one at a time and reading stops once the array would exceed
    ``budget`` bytes (so a reply always fits in a frame) or ``limit`` points are
    taken: never more than one row beyond what is returned is loaded. Points are
    stored as ASCII JSON text and never re-parsed.
    """
    cursor = conn.execute(
        "SELECT data FROM vitals WHERE node_id = ? AND ts > ? ORDER BY ts LIMIT ?",
        # without ``since``, every point: even a ts at or before 0 (a slave without a clock)
        (node_id, -math.inf if since is None else since, limit + 1),
    )
    parts: list[str] = []
    size = 2
    more = False
    try:
        for (data,) in cursor:
            size += len(data) + 1
            if len(parts) >= limit or size > budget:
                more = True
                break
            parts.append(data)
    finally:
        cursor.close()
    return "[" + ",".join(parts) + "]", more
