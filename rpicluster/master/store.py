"""SQLite persistence of the registry and of the vitals history.

The database is ``state_dir/rpicluster.db`` in WAL mode. One writer thread owns
the connection and is fed by a queue: the event loop only enqueues batches, so a
slow SD card never stalls heartbeats. Reads for the ``history`` query go through
the same queue, so they see every write enqueued before them, and their answer
comes back to the loop through a callback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

DB_NAME = "rpicluster.db"
PRUNE_INTERVAL = 60.0  # seconds between two deletions of history older than the window
_BATCH = 500  # queue items applied in one transaction at most

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


class StoreError(Exception):
    """The database cannot be opened or read; the message names the file."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


class Store:
    """The master's database; :meth:`load_nodes` at start, then queued writes."""

    def __init__(self, state_dir: str, history_window: float) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.history_window = history_window
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the master database: {exc}") from None
        self._queue: queue.Queue[Optional[tuple[str, Any]]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._last_prune = 0.0
        self.write_errors = 0

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
            except ValueError:
                log.warning("%s: skipping node %r with a corrupt row", self.path, row[0])
        return nodes

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rpicluster-store", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Apply everything queued, then close the database."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s: writer did not finish within %g s", self.path, timeout)
                return
            self._thread = None
        self._conn.close()

    # ---------------------------------------------------------------- writes

    def save_nodes(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self._queue.put(("nodes", rows))

    def save_last_seen(self, rows: list[tuple[Optional[float], str]]) -> None:
        if rows:
            self._queue.put(("seen", rows))

    def add_vitals(self, points: list[tuple[str, float, str]]) -> None:
        if points:
            self._queue.put(("vitals", points))

    def read(self, fn: Callable[[sqlite3.Connection], Any], done: Callable[[Any], None]) -> None:
        """Run ``fn(conn)`` after every queued write; pass its result (or exception) to ``done``.

        ``done`` runs on the writer thread: hand the result to the loop with
        ``call_soon_threadsafe``.
        """
        self._queue.put(("read", (fn, done)))

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        conn = self._conn
        stopping = False
        while not stopping:
            items = [self._queue.get()]
            while len(items) < _BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            writes = []
            for item in items:
                if item is None:
                    stopping = True
                elif item[0] == "read":
                    self._apply(conn, writes)
                    writes = []
                    fn, done = item[1]
                    try:
                        result = fn(conn)
                    except Exception as exc:  # handed to the caller, who answers the peer
                        result = exc
                    done(result)
                else:
                    writes.append(item)
            self._apply(conn, writes)
            now = time.time()
            if now - self._last_prune >= PRUNE_INTERVAL or stopping:
                self._last_prune = now
                self._apply(conn, [("prune", now - self.history_window)])

    def _apply(self, conn: sqlite3.Connection, writes: list[tuple[str, Any]]) -> None:
        if not writes:
            return
        try:
            conn.execute("BEGIN")
            for kind, payload in writes:
                if kind == "nodes":
                    conn.executemany(_UPSERT, payload)
                elif kind == "seen":
                    conn.executemany("UPDATE nodes SET last_seen = ? WHERE node_id = ?", payload)
                elif kind == "vitals":
                    conn.executemany("INSERT INTO vitals VALUES (?, ?, ?)", payload)
                elif kind == "prune":
                    conn.execute("DELETE FROM vitals WHERE ts < ?", (payload,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.write_errors += 1
            log.error("%s: write of %d batches failed: %s", self.path, len(writes), exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")


def read_history(
    conn: sqlite3.Connection, node_id: str, since: Optional[float], limit: int, budget: int
) -> tuple[str, bool]:
    """The points after ``since`` as a JSON array text, oldest first, and whether more exist.

    Stops early when the array would exceed ``budget`` bytes, so a reply always
    fits in a frame. Points are stored as JSON text and never re-parsed.
    """
    rows = conn.execute(
        "SELECT data FROM vitals WHERE node_id = ? AND ts > ? ORDER BY ts LIMIT ?",
        (node_id, -1.0 if since is None else since, limit + 1),
    ).fetchall()
    more = len(rows) > limit
    parts: list[str] = []
    size = 2
    for (data,) in rows[:limit]:
        size += len(data) + 1
        if size > budget:
            more = True
            break
        parts.append(data)
    return "[" + ",".join(parts) + "]", more
