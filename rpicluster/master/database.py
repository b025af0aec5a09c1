"""The master's SQLite file: its schema, how it is opened, its statements, row repair.

Split from ``store.py`` so what is on disk is read in one place: the two tables
and their index, the pragmas (WAL, a bounded WAL file), the statements the
writer runs, which errors one row (not the database) is to blame for and how
such a row is repaired, and :func:`read_history`, the one read that answers the
``history`` query. ``store.py`` decides when and in which thread they run.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any, Optional

DB_NAME = "rpicluster.db"
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint
WAL_AUTOCHECKPOINT = 1000  # pages (4 KiB each) of WAL that trigger a checkpoint

SCHEMA = """
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

UPSERT = (
    "INSERT OR REPLACE INTO nodes (node_id, hostname, address, roles, state, last_seen,"
    " details, vitals, action_errors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SEEN = "UPDATE nodes SET last_seen = ? WHERE node_id = ?"
POINT = "INSERT INTO vitals VALUES (?, ?, ?)"
# A forgotten node (``rpicluster forget``, ``forget_after``): its row and its history.
FORGET_NODE = "DELETE FROM nodes WHERE node_id = ?"
FORGET_POINTS = "DELETE FROM vitals WHERE node_id = ?"
# Keep a node's newest ``keep`` points (by ts); walks its index range from the newest.
TRIM = (
    "DELETE FROM vitals WHERE rowid IN (SELECT rowid FROM vitals WHERE node_id = ?"
    " ORDER BY ts DESC LIMIT -1 OFFSET ?)"
)

# What one row (not the database) is to blame for: a string SQLite's UTF-8
# encoder refuses (UnicodeEncodeError is a ValueError), an integer out of
# SQLite's range, a value of the wrong type or a NOT NULL column left empty.
ROW_ERRORS = (
    ValueError,
    OverflowError,
    TypeError,
    sqlite3.InterfaceError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if need be) the database in WAL mode, with its schema."""
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    # A database written by an older master (or damaged) may hold TEXT that is not
    # UTF-8: read it with U+FFFD rather than fail the whole query and the start.
    conn.text_factory = _text
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
    conn.executescript(SCHEMA)
    return conn


def repaired_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with each string SQLite cannot encode made valid (U+FFFD for a lone surrogate)."""
    return tuple(
        value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if isinstance(value, str) and not value.isascii()
        else value
        for value in row
    )


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
