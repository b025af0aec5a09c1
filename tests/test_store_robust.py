"""The master's store cannot die silently (issue 7 section 3).

Bad rows, a failing disk, a flood of vitals, a dead writer and a shutdown racing
a history read, each against a real SQLite file that is reopened to check what
was saved. A failing or slow disk is simulated by a proxy around the writer's
connection, switched on and off by the test.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rpicluster import protocol as p
from rpicluster.master import database, saving, writequeue
from rpicluster.master import store as store_module
from rpicluster.master.database import JOURNAL_SIZE_LIMIT, read_history
from rpicluster.master.saving import TRIM_EVERY
from rpicluster.master.store import PENDING_READS, Store, StoreError, points_cap
from rpicluster.master.writequeue import QUEUE_BYTES, QUEUE_POINTS, TXN_POINTS
from tests.helpers import wait_for

# SystemExit raised inside the writer ends its thread (as a bug's BaseException
# would); pytest reports the thread's exception, which is the point here.
_WRITER_KILLED = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class FlakyConnection:
    """The writer's connection, made to fail (``fail``) or to hang (``hold``) on writes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.fail: BaseException | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.held = threading.Event()  # set while a write waits on ``hold``
        self.largest_insert = 0  # most vitals points inserted by one executemany

    def _gate(self, sql: str) -> None:
        if sql.lstrip().upper().startswith(("SELECT", "PRAGMA", "ROLLBACK")):
            return
        if not self.hold.is_set():
            self.held.set()
            self.hold.wait(30)
            self.held.clear()
        if self.fail is not None:
            raise self.fail

    def execute(self, sql: str, *args: Any) -> Any:
        self._gate(sql)
        return self.conn.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        self._gate(sql)
        if sql.startswith("INSERT INTO vitals"):
            rows = list(rows)
            self.largest_insert = max(self.largest_insert, len(rows))
        return self.conn.executemany(sql, rows)

    def close(self) -> None:
        self.conn.close()


def node_row(node_id: str, hostname: str = "pi", last_seen: Any = 1.0) -> tuple[Any, ...]:
    return (node_id, hostname, "10.0.0.1", '["basic"]', "alive", last_seen, "{}", None, "{}")


def point(node_id: str, ts: float, size: int = 0) -> tuple[str, float, str]:
    return (node_id, ts, json.dumps({"ts": ts, "pad": "x" * size}))


def saved(state_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, float]]]:
    """(node_id, hostname) of every node row and (node_id, ts) of every point, from the file."""
    conn = sqlite3.connect(str(state_dir / database.DB_NAME))
    try:
        nodes = conn.execute("SELECT node_id, hostname FROM nodes ORDER BY rowid").fetchall()
        points = conn.execute("SELECT node_id, ts FROM vitals ORDER BY node_id, ts").fetchall()
    finally:
        conn.close()
    return nodes, points


def writer_stopped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "database writer stopped" in r.getMessage()]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def started(state_dir: Path):
    """A started Store whose connection is a FlakyConnection; closed at teardown."""
    store = Store(str(state_dir), history_window=3600)
    flaky = FlakyConnection(store._conn)
    store._conn = flaky  # type: ignore[assignment]
    store.start()
    yield store, flaky
    flaky.hold.set()
    flaky.fail = None
    store.close()


def test_a_poisoned_row_does_not_kill_the_writer_or_its_batch(started, state_dir):
    store, _ = started
    now = time.time()
    store.save_nodes(
        [
            node_row("good-1"),
            node_row("surrogate", hostname="pi-\ud800"),  # SQLite's UTF-8 encoder refuses it
            node_row("null-host", hostname=None),  # NOT NULL: cannot be repaired
            node_row("huge", last_seen=10**400),  # no SQLite number holds it
            node_row("good-2"),
        ]
    )
    store.add_vitals([point("good-1", now), point("\udfff", now), point("good-2", now)])
    wait_for(lambda: store.rejected_total == 2, what="the two unrepairable rows refused")
    assert store.repaired_total == 2
    assert store.health()["ok"] is True
    # The writer is still alive and keeps saving what comes next.
    store.save_nodes([node_row("after")])
    store.add_vitals([point("after", now + 1)])
    wait_for(lambda: not store.health()["pending_rows"] and not store.health()["lag_seconds"])
    store.close()
    nodes, points = saved(state_dir)
    assert nodes == [
        ("good-1", "pi"),
        ("surrogate", "pi-\ufffd\ufffd\ufffd"),
        ("good-2", "pi"),
        ("after", "pi"),
    ]
    assert [node_id for node_id, _ in points] == ["after", "good-1", "good-2", "\ufffd" * 3]


def test_health_says_when_writes_fail_and_when_they_succeed_again(started, state_dir, monkeypatch):
    monkeypatch.setattr(store_module, "RETRY_MAX", 0.2)
    store, flaky = started
    assert store.health() == {
        "ok": True,
        "error": None,
        "queue": 0,
        "queue_limit": QUEUE_POINTS,
        "queue_bytes": 0,
        "queue_bytes_limit": QUEUE_BYTES,
        "pending_rows": 0,
        "lag_seconds": 0.0,
        "dropped_total": 0,
        "rejected_total": 0,
        "write_errors_total": 0,
    }
    flaky.fail = sqlite3.OperationalError("database or disk is full")
    now = time.time()
    store.save_nodes([node_row("n1")])
    store.add_vitals([point("n1", now + i) for i in range(10)])
    health = wait_for(
        lambda: (lambda h: h if not h["ok"] else None)(store.health()), what="health not ok"
    )
    assert health["error"] == "database or disk is full"
    assert health["write_errors_total"] >= 1
    # The error shows as soon as the write fails; the failed batch goes back to
    # the queue just after (the writer's put_back): await both, not one.
    wait_for(
        lambda: (lambda h: h["queue"] == 10 and h["pending_rows"] == 1)(store.health()),
        what="the failed row and points kept for a retry",
    )
    flaky.fail = None  # the disk has room again
    wait_for(lambda: store.health()["ok"], what="health ok again")
    wait_for(lambda: store.health()["queue"] == 0 and store.health()["lag_seconds"] == 0)
    assert store.health()["dropped_total"] == 0
    store.close()
    nodes, points = saved(state_dir)
    assert nodes == [("n1", "pi")]
    assert len(points) == 10


def test_health_says_when_writes_lag(started, monkeypatch):
    monkeypatch.setattr(store_module, "LAG_LIMIT", 0.2)
    store, flaky = started
    flaky.hold.clear()  # a disk that takes forever
    store.add_vitals([point("n1", time.time())])
    wait_for(flaky.held.is_set, what="the writer blocked")
    health = wait_for(
        lambda: (lambda h: h if not h["ok"] else None)(store.health()), what="lag noticed"
    )
    assert health["error"].startswith("writes are ") and health["error"].endswith(" s behind")
    assert health["lag_seconds"] >= 0.2  # reported to the millisecond
    flaky.hold.set()
    wait_for(lambda: store.health()["ok"], what="caught up")


def test_the_queue_stays_bounded_under_a_flood(started, state_dir, caplog):
    store, flaky = started
    flaky.hold.clear()
    store.add_vitals([point("blocker", 0.0)])
    wait_for(flaky.held.is_set, what="the writer blocked")
    base = time.time()
    total = 3 * QUEUE_POINTS
    began = time.monotonic()
    for chunk in range(0, total, 1000):  # as the loop's flushes would hand them over
        store.add_vitals([point(f"n{i % 10}", base + i / 1000) for i in range(chunk, chunk + 1000)])
        for i in range(chunk, chunk + 1000, 100):
            store.save_nodes([node_row("n1", hostname=f"pi-{i}")])  # coalesced by id
    handing_over = time.monotonic() - began
    health = store.health()
    assert health["queue"] == QUEUE_POINTS
    assert health["pending_rows"] == 1
    assert health["dropped_total"] == total - QUEUE_POINTS
    assert health["ok"] is False
    assert health["error"] == "vitals points dropped in the last 30 s (write queue full)"
    said = [r for r in caplog.records if "vitals points dropped" in r.getMessage()]
    assert len(said) == 1  # 40 flushes dropped points; one log line a minute says so
    # Handing over never waited on the blocked disk (60,000 points, generous bound).
    assert handing_over < 10.0
    flaky.hold.set()
    store.close()
    nodes, points = saved(state_dir)
    assert nodes == [("n1", f"pi-{total - 100}")]  # the latest row won
    kept = sorted(ts for node_id, ts in points if node_id != "blocker")
    assert len(kept) == QUEUE_POINTS
    assert flaky.largest_insert == TXN_POINTS  # written in several transactions, WAL bounded
    # The oldest were dropped, the newest kept.
    assert kept[0] == base + (total - QUEUE_POINTS) / 1000
    assert kept[-1] == base + (total - 1) / 1000


def test_the_queue_is_bounded_in_bytes_too(started):
    store, flaky = started
    flaky.hold.clear()
    store.add_vitals([point("n0", 0.0)])
    wait_for(flaky.held.is_set, what="the writer blocked")
    big = 64 * 1024
    count = 2 * QUEUE_BYTES // big
    for i in range(count):
        store.add_vitals([point("n1", float(i), size=big)])
    health = store.health()
    assert QUEUE_BYTES - 2 * big < health["queue_bytes"] <= QUEUE_BYTES
    assert health["dropped_total"] == count - health["queue"]
    flaky.hold.set()


def test_shutdown_saves_the_final_batch_while_a_history_read_meets_a_closed_loop(
    started, state_dir, caplog
):
    store, flaky = started
    closed_loop = asyncio.new_event_loop()
    closed_loop.close()
    handed: list[Any] = []

    def done(result: Any) -> None:  # what connection.py does: raises on a closed loop
        handed.append(result)
        closed_loop.call_soon_threadsafe(print, result)

    flaky.hold.clear()
    now = time.time()
    store.add_vitals([point("n1", now)])
    wait_for(flaky.held.is_set, what="the writer blocked")
    store.read(lambda conn: read_history(conn, "n1", None, 1000, 65536), done)
    store.save_nodes([node_row("n1")])
    store.add_vitals([point("n1", now + i) for i in range(1, 50)])
    closer = threading.Thread(target=store.close, args=(20.0,))
    closer.start()
    wait_for(lambda: store._stopping, what="close() under way")
    store.save_last_seen([(now + 60, "n1")])  # the very last write, as stop() makes
    flaky.hold.set()
    closer.join(30)
    assert not closer.is_alive()
    assert len(handed) == 1 and not isinstance(handed[0], Exception)
    assert not writer_stopped(caplog)  # it wrote the final batch itself
    nodes, points = saved(state_dir)
    assert nodes == [("n1", "pi")]
    assert len(points) == 50
    conn = sqlite3.connect(str(state_dir / database.DB_NAME))
    assert conn.execute("SELECT last_seen FROM nodes").fetchone() == (now + 60,)
    conn.close()


@_WRITER_KILLED
def test_reads_fail_fast_when_the_writer_is_dead_or_busy(started, state_dir):
    store, flaky = started
    answers: list[Any] = []
    flaky.hold.clear()
    store.add_vitals([point("n1", 1.0)])
    wait_for(flaky.held.is_set, what="the writer blocked")
    for _ in range(PENDING_READS + 1):
        store.read(lambda conn: "read", answers.append)
    assert len(answers) == 1 and isinstance(answers[0], StoreError)  # the 65th, at once
    assert "already waiting" in str(answers[0])
    flaky.fail = SystemExit()  # anything that escapes the writer's guard ends the thread
    flaky.hold.set()
    wait_for(lambda: not store._thread.is_alive(), what="the writer thread ended")
    assert len(answers) == PENDING_READS + 1  # the waiting reads were answered (with errors)
    assert all(isinstance(answer, StoreError) for answer in answers)
    health = store.health()
    assert health["ok"] is False and health["error"] == "the database writer is not running"
    began = time.monotonic()
    store.read(lambda conn: "read", answers.append)
    # At once, not never: a read handed to the dead writer would wait forever
    # (generous for a loaded machine; how fast is not the point).
    assert time.monotonic() - began < 5.0
    assert isinstance(answers[-1], StoreError)
    # Writes handed over to a dead writer are still saved by close().
    flaky.fail = None
    store.save_nodes([node_row("late")])
    store.close()
    assert saved(state_dir)[0] == [("late", "pi")]
    store.close()  # idempotent


def test_each_node_keeps_at_most_its_cap_of_points(state_dir):
    store = Store(str(state_dir), history_window=60)
    cap = points_cap(60)
    assert cap == 4096
    store.start()
    now = time.time()
    flood = cap + 3 * TRIM_EVERY + 7
    for start in range(0, flood, 500):
        store.add_vitals(
            [point("flood", now + i / 1000) for i in range(start, min(flood, start + 500))]
        )
        store.add_vitals([point("calm", now + start)])
    store.close()
    conn = sqlite3.connect(str(state_dir / database.DB_NAME))
    counts = dict(conn.execute("SELECT node_id, COUNT(*) FROM vitals GROUP BY node_id"))
    newest = conn.execute("SELECT MAX(ts) FROM vitals WHERE node_id = 'flood'").fetchone()[0]
    conn.close()
    assert counts["flood"] <= cap
    assert counts["calm"] == len(range(0, flood, 500))
    assert newest == now + (flood - 1) / 1000
    assert points_cap(86400) == 86400  # one a second over a long window


def test_the_journal_is_bounded(state_dir):
    store = Store(str(state_dir), history_window=3600)
    assert store._conn.execute("PRAGMA journal_size_limit").fetchone() == (JOURNAL_SIZE_LIMIT,)
    assert store._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.start()
    now = time.time()
    for chunk in range(20):
        store.add_vitals([point(f"n{i}", now + chunk, size=200) for i in range(1000)])
    store.close()
    wal = state_dir / (database.DB_NAME + "-wal")
    assert not wal.exists() or wal.stat().st_size <= JOURNAL_SIZE_LIMIT


class CountingConnection:
    """Counts the rows a query's cursor hands out."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.rows = 0

    def execute(self, sql: str, args: Any) -> Any:
        cursor = self.conn.execute(sql, args)
        outer = self

        class Cursor:
            def __iter__(self) -> Any:
                for row in cursor:
                    outer.rows += 1
                    yield row

            def close(self) -> None:
                cursor.close()

        return Cursor()


def test_history_reads_stop_at_their_budget(state_dir):
    store = Store(str(state_dir), history_window=3600)
    store.start()
    now = time.time()
    store.add_vitals([point("n1", now + i, size=1000) for i in range(1001)])
    store.close()
    conn = sqlite3.connect(str(state_dir / database.DB_NAME))
    counting = CountingConnection(conn)
    text, more = read_history(counting, "n1", None, 1000, 10_000)  # type: ignore[arg-type]
    assert more is True
    assert 5 <= len(json.loads(text)) <= 10 and len(text) <= 10_000
    assert counting.rows == len(json.loads(text)) + 1  # one row beyond, no more
    counting.rows = 0
    text, more = read_history(counting, "n1", None, 3, 10**9)  # type: ignore[arg-type]
    assert (len(json.loads(text)), more, counting.rows) == (3, True, 4)
    text, more = read_history(conn, "n1", now + 995, 1000, 10**9)
    assert (len(json.loads(text)), more) == (5, False)
    conn.close()


# ------------------------------------------------------------- through the master


def connect(master, secret, node_id="node-1", role="vitals"):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    p.client_handshake(sock, secret, kind="slave", node_id=node_id, role=role)
    return sock


def query(sock, qid, what, **fields):
    p.send_frame(sock, p.make(p.QUERY, id=qid, what=what, **fields))
    while True:
        message = p.recv_message(sock)
        if message["type"] == p.REPLY and message["id"] == qid:
            return message


def test_the_master_dict_carries_the_store_health(master, cluster_secret):
    sock = connect(master, cluster_secret)
    reply = query(sock, 1, "cluster")
    store = reply["data"]["master"]["store"]
    assert store["ok"] is True and store["error"] is None
    assert store["queue_limit"] == QUEUE_POINTS
    sock.close()


@_WRITER_KILLED
def test_history_query_answers_internal_at_once_when_the_writer_is_dead(master, cluster_secret):
    sock = connect(master, cluster_secret)
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": time.time(), "cpu_percent": 1.0}))
    assert query(sock, 1, "history", node_id="node-1")["ok"] is True
    flaky = FlakyConnection(master.store._conn)
    master.store._conn = flaky
    flaky.fail = SystemExit()
    p.send_frame(sock, p.make(p.VITALS, vitals={"ts": time.time(), "cpu_percent": 2.0}))
    wait_for(lambda: not master.store._thread.is_alive(), what="the writer thread ended")
    began = time.monotonic()
    reply = query(sock, 2, "history", node_id="node-1")
    # At once, not never: a query the dead writer never answered would time out (10 s).
    assert time.monotonic() - began < 5.0
    assert reply["ok"] is False and reply["error"]["code"] == "internal"
    health = query(sock, 3, "cluster")["data"]["master"]["store"]
    assert health["ok"] is False and health["error"] == "the database writer is not running"
    flaky.fail = None  # so that stop() can save what is left
    sock.close()


def test_stop_saves_everything_while_a_history_read_outlives_the_loop(
    master_factory, cluster_secret, caplog
):
    master = master_factory()
    state_dir = Path(master.config.master.state_dir)
    sock = connect(master, cluster_secret)
    base = time.time()
    for i in range(5):
        p.send_frame(sock, p.make(p.VITALS, vitals={"ts": base + i, "cpu_percent": 1.0}))
    assert len(query(sock, 1, "history", node_id="node-1")["data"]["points"]) == 5
    flaky = FlakyConnection(master.store._conn)
    master.store._conn = flaky
    flaky.hold.clear()  # a slow SD card: the next write and the read behind it wait
    for i in range(5, 10):
        p.send_frame(sock, p.make(p.VITALS, vitals={"ts": base + i, "cpu_percent": 1.0}))
    p.send_frame(sock, p.make(p.QUERY, id=2, what="history", node_id="node-1"))
    wait_for(flaky.held.is_set, what="the writer blocked")
    stopper = threading.Thread(target=master.stop, args=(20.0,))
    stopper.start()
    wait_for(lambda: master.loop.is_closed(), what="the event loop closed")
    flaky.hold.set()  # the read now finishes after the loop closed
    stopper.join(30)
    assert not stopper.is_alive()
    assert not writer_stopped(caplog)
    sock.close()
    nodes, points = saved(state_dir)
    assert [node_id for node_id, _ in nodes] == ["node-1"]
    assert [ts for _, ts in points] == [base + i for i in range(10)]


def test_history_older_than_the_window_is_pruned_for_every_known_node(state_dir):
    store = Store(str(state_dir), history_window=60)
    store.start()
    now = time.time()
    store.save_nodes([node_row("quiet")])
    store.add_vitals([point("quiet", now - 30), point("chatty", now - 30), point("chatty", now)])
    wait_for(lambda: {"quiet", "chatty"} <= set(store._since_trim), what="points saved")
    assert store._pruned_all  # the first prune (a full scan) came with the first write
    # An hour later, as far as the window is concerned: "quiet" sent nothing since
    # (only its row knows it), "chatty" did (its points know it).
    del store._since_trim["quiet"]
    store.history_window = 10
    store._last_prune = 0.0  # the prune is due
    store.save_nodes([node_row("other")])
    store.close()
    points = saved(state_dir)[1]
    assert points == [("chatty", now)]


def test_the_documented_bounds_are_the_code_s():
    root = Path(__file__).resolve().parent.parent
    # Whitespace-normalized, so re-wrapping a paragraph does not matter.
    protocol = " ".join((root / "docs" / "protocol.md").read_text(encoding="utf-8").split())
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    assert f"({QUEUE_POINTS:,})" in protocol and f"{QUEUE_POINTS:,} vitals points" in readme
    assert QUEUE_BYTES == 16 * 1024 * 1024 and "(16 MiB)" in protocol and "16 MiB" in readme
    assert f"longer than {store_module.LAG_LIMIT:g} s" in protocol
    assert f"{PENDING_READS} history reads already wait" in protocol
    assert f"{store_module.RETRY_MIN:g} s then doubling to {store_module.RETRY_MAX:g} s" in protocol
    assert f"max({store_module.POINTS_PER_NODE}, history_window)" in protocol
    assert f"max({store_module.POINTS_PER_NODE}, history_window)" in readme
    assert JOURNAL_SIZE_LIMIT == 4 * 1024 * 1024 and "truncated to 4 MiB" in readme
    assert f"every {database.WAL_AUTOCHECKPOINT:,} pages" in readme
    assert writequeue.TXN_BYTES == 1024 * 1024
    assert f"at most {TXN_POINTS:,} points or 1 MiB of them" in readme
    assert saving.PRUNE_INTERVAL == 60 and "deleted every minute" in readme


def test_a_member_s_surrogate_hostname_cannot_stop_the_master_saving(
    master_factory, cluster_secret
):
    """End to end: whether the master refuses the hello or stores the name repaired,
    the writer keeps running and a good node joining afterwards is saved."""
    master = master_factory()
    state_dir = Path(master.config.master.state_dir)
    bad = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    try:
        p.client_handshake(
            bad,
            cluster_secret,
            kind="slave",
            node_id="poison",
            role="basic",
            details={"hostname": "pi-\ud800"},
        )
        p.send_frame(bad, p.make(p.HEARTBEAT, seq=1, sent_at=time.time()))
        p.recv_message(bad)
    except (p.ProtocolError, OSError):
        pass  # refused at the door: fine too
    good = connect(master, cluster_secret, node_id="good", role="vitals")
    p.send_frame(good, p.make(p.VITALS, vitals={"ts": time.time(), "cpu_percent": 5.0}))
    assert query(good, 1, "history", node_id="good")["data"]["points"]  # written and read back
    health = query(good, 2, "cluster")["data"]["master"]["store"]
    assert health["ok"] is True and master.store._thread.is_alive()
    bad.close()
    good.close()
    master.stop()
    nodes = dict(saved(state_dir)[0])
    assert "good" in nodes
    assert "\ud800" not in nodes.get("poison", "")


def test_stop_saves_the_registry_itself_when_the_shutdown_coroutine_fails(
    master_factory, cluster_secret
):
    master = master_factory()
    state_dir = Path(master.config.master.state_dir)
    sock = connect(master, cluster_secret)
    master.loop.call_soon_threadsafe(lambda: [timer.cancel() for timer in master._timers])
    base = time.time()
    for i in range(3):
        p.send_frame(sock, p.make(p.VITALS, vitals={"ts": base + i, "cpu_percent": 1.0}))
    wait_for(lambda: len(master.registry.pending_vitals) == 3, what="3 points not yet flushed")

    async def failing_shutdown() -> None:
        raise RuntimeError("a bug in _shutdown")

    master._shutdown = failing_shutdown
    master.stop()
    sock.close()
    nodes, points = saved(state_dir)
    assert [node_id for node_id, _ in nodes] == ["node-1"]
    assert [ts for _, ts in points] == [base + i for i in range(3)]


def test_a_master_starts_on_an_old_database_with_undecodable_and_deeply_nested_rows(
    tmp_path, master_factory
):
    # Rows as a damaged card or an older master may have left them: TEXT that is not
    # UTF-8, JSON nested past the decoder's recursion limit, and one good node.
    state_dir = tmp_path / "old"
    Store(str(state_dir), 3600).close()
    conn = sqlite3.connect(str(state_dir / "rpicluster.db"))
    columns = "node_id, hostname, address, roles, state, last_seen, details, vitals, action_errors"
    row = "(?, ?, '10.0.0.9', '[\"basic\"]', 'dead', 1.0, ?, NULL, '{}')"
    details = b'{"hostname": "rasp\xffberry"}'
    conn.execute(f"INSERT INTO nodes ({columns}) VALUES {row}", ("bad-text", "x", details))
    conn.execute("UPDATE nodes SET details = CAST(details AS TEXT) WHERE node_id = 'bad-text'")
    assert conn.execute("SELECT typeof(details) FROM nodes").fetchone() == ("text",)
    conn.execute(f"INSERT INTO nodes ({columns}) VALUES {row}", ("deep", "deep", "[" * 100_000))
    conn.execute(f"INSERT INTO nodes ({columns}) VALUES {row}", ("good", "good", "{}"))
    conn.commit()
    conn.close()
    master = master_factory(state_dir=str(state_dir))
    nodes = {node["node_id"]: node for node in master.cluster_state()["nodes"]}
    assert "good" in nodes and "deep" not in nodes
    assert "\ufffd" in nodes["bad-text"]["hostname"]  # read with U+FFFD, not a failed start
