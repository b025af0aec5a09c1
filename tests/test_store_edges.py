"""The store at its edges: its queue's bounds at exactly their limits, the order in which
a failed batch goes back, history reads at their exact budget, pruning, trimming, and
the health it reports. Real SQLite files in tmp_path, reopened to see what was saved."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from rpicluster.master import store as s
from rpicluster.master import writequeue as wq
from rpicluster.master.database import read_history, repaired_row
from rpicluster.master.store import Store, StoreError, points_cap
from rpicluster.master.writequeue import Batch
from tests.helpers import wait_for


def point(node_id: str, ts: float, size: int = 10) -> tuple[str, float, str]:
    """A vitals point whose JSON is exactly ``size`` bytes."""
    data = json.dumps({"p": "x" * (size - 9)})
    assert len(data) == size
    return (node_id, ts, data)


def node_row(node_id: str, state: str = "alive", last_seen: Any = 1.0) -> tuple[Any, ...]:
    return (node_id, "pi", "10.0.0.1", '["basic"]', state, last_seen, "{}", None, "{}")


def db_rows(state_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        return db.execute(sql).fetchall()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


# A window so long that the prune of the first write keeps the small test timestamps.
FOREVER = 10.0**10


@pytest.fixture
def store(state_dir: Path):
    instance = Store(str(state_dir), FOREVER)
    instance.start()
    yield instance
    instance.close()


def written(store: Store) -> bool:
    """Everything handed over is in the file (the writer answers a read after it)."""
    done = threading.Event()
    answers: list[Any] = []
    store.read(lambda conn: "read", lambda result: (answers.append(result), done.set()))
    return done.wait(10) and answers == ["read"]


# ------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("window", "cap"), [(60, 4096), (4096.9, 4096), (4097, 4097), (86400.5, 86400)]
)
def test_points_cap_is_one_a_second_over_the_window_and_4096_at_least(window, cap):
    assert points_cap(window) == cap


def test_repaired_replaces_only_what_sqlite_cannot_encode():
    row = ("id", "pi\ud800", "é", 3, None, b"raw")
    # the three bytes of the lone surrogate's surrogatepass encoding, each replaced
    assert repaired_row(row) == ("id", "pi\ufffd\ufffd\ufffd", "é", 3, None, b"raw")
    assert repaired_row(("ascii",)) == ("ascii",)


# --------------------------------------------------------------------- batch


def test_a_batch_has_writes_from_any_kind_of_row_but_not_from_reads():
    batch = Batch()
    assert not batch.has_writes() and batch.rows() == 0
    batch.reads.append((lambda conn: None, lambda result: None))
    assert not batch.has_writes()
    for fill in (
        lambda b: b.nodes.update(n=node_row("n")),
        lambda b: b.seen.update(n=(1.0, "n")),
        lambda b: b.add_points([point("n", 1.0)]),
        lambda b: b.forgets.add("n"),
    ):
        batch = Batch()
        fill(batch)
        assert batch.has_writes()
    batch = Batch()
    batch.nodes["a"] = node_row("a")
    batch.seen["b"] = (1.0, "b")
    batch.forgets.update({"c", "d"})
    assert batch.rows() == 4


def test_the_queue_keeps_exactly_its_limit_of_points(monkeypatch):
    monkeypatch.setattr(wq, "QUEUE_POINTS", 5)
    batch = Batch()
    assert batch.add_points([point("n", t) for t in range(5)]) == 0
    assert len(batch.points) == 5
    assert batch.add_points([point("n", 5), point("n", 6)]) == 2
    assert [pt[1] for pt in batch.points] == [2, 3, 4, 5, 6]  # the oldest went
    assert batch.point_bytes == 50


def test_the_queue_keeps_exactly_its_limit_of_bytes(monkeypatch):
    monkeypatch.setattr(wq, "QUEUE_BYTES", 30)
    batch = Batch()
    assert batch.add_points([point("n", t) for t in range(3)]) == 0
    assert batch.point_bytes == 30
    assert batch.add_points([point("n", 3, size=11)]) == 2  # 41 bytes: two oldest go
    assert [pt[1] for pt in batch.points] == [2, 3]
    assert batch.point_bytes == 21


def test_points_put_in_front_keep_their_order():
    batch = Batch()
    batch.add_points([point("n", 3), point("n", 4)])
    batch.add_points([point("n", 1), point("n", 2)], front=True)
    assert [pt[1] for pt in batch.points] == [1, 2, 3, 4]
    assert batch.point_bytes == 40


def test_forgetting_drops_what_is_queued_for_the_node():
    batch = Batch()
    batch.nodes["a"] = node_row("a")
    batch.nodes["b"] = node_row("b")
    batch.seen["a"] = (1.0, "a")
    batch.add_points([point("a", 1), point("b", 2, size=12), point("a", 3)])
    batch.forget("a")
    assert list(batch.nodes) == ["b"] and batch.seen == {}
    assert list(batch.points) == [point("b", 2, size=12)]
    assert batch.point_bytes == 12
    assert batch.forgets == {"a"}
    batch.forget("c")  # nothing queued for it: only the deletion
    assert batch.point_bytes == 12 and batch.forgets == {"a", "c"}


def test_take_oldest_stops_at_the_transaction_limit_of_points(monkeypatch):
    monkeypatch.setattr(wq, "TXN_POINTS", 3)
    batch = Batch()
    batch.nodes["a"] = node_row("a")
    batch.seen["a"] = (1.0, "a")
    batch.forgets.add("z")
    batch.since = 42.0
    batch.add_points([point("n", t) for t in range(5)])
    taken = batch.take_oldest()
    assert [pt[1] for pt in taken.points] == [0, 1, 2]
    assert (taken.point_bytes, batch.point_bytes) == (30, 20)
    assert list(taken.nodes) == ["a"] and list(taken.seen) == ["a"] and taken.forgets == {"z"}
    assert batch.nodes == {} and batch.seen == {} and batch.forgets == set()
    assert taken.since == 42.0 and batch.since == 42.0
    assert [pt[1] for pt in batch.points] == [3, 4]


def test_take_oldest_stops_once_the_transaction_bytes_are_reached(monkeypatch):
    monkeypatch.setattr(wq, "TXN_BYTES", 25)
    batch = Batch()
    batch.add_points([point("n", t) for t in range(5)])
    taken = batch.take_oldest()
    assert [pt[1] for pt in taken.points] == [0, 1, 2]  # 30 bytes: the third crossed 25
    monkeypatch.setattr(wq, "TXN_BYTES", 20)
    again = batch.take_oldest()
    assert [pt[1] for pt in again.points] == [3, 4]
    assert batch.point_bytes == 0


def test_a_failed_batch_goes_back_before_the_newer_rows():
    newer = Batch()
    newer.nodes["a"] = node_row("a", state="left")
    newer.seen["b"] = (9.0, "b")
    newer.add_points([point("n", 5)])
    newer.since = 20.0
    older = Batch()
    older.nodes["a"] = node_row("a", state="alive")
    older.nodes["c"] = node_row("c")
    older.seen["b"] = (1.0, "b")
    older.add_points([point("n", 1), point("n", 2)])
    older.since = 10.0
    assert newer.put_back(older) == 0
    assert newer.nodes["a"][4] == "left" and list(newer.nodes) == ["a", "c"]
    assert newer.seen["b"] == (9.0, "b")
    assert [pt[1] for pt in newer.points] == [1, 2, 5]
    assert newer.since == 10.0


def test_a_failed_batch_keeps_the_newer_since_when_it_has_none():
    newer = Batch()
    newer.since = 20.0
    older = Batch()
    newer.put_back(older)
    assert newer.since == 20.0
    empty = Batch()
    older.since = 5.0
    empty.put_back(older)
    assert empty.since == 5.0
    later = Batch()
    later.since = 3.0
    older.since = 4.0
    later.put_back(older)
    assert later.since == 3.0


def test_a_node_forgotten_meanwhile_does_not_come_back_with_the_failed_batch():
    newer = Batch()
    newer.forget("gone")
    older = Batch()
    older.nodes["gone"] = node_row("gone")
    older.nodes["kept"] = node_row("kept")
    older.seen["gone"] = (1.0, "gone")
    older.forgets.add("earlier")
    older.add_points([point("gone", 1), point("kept", 2)])
    newer.put_back(older)
    assert list(newer.nodes) == ["kept"] and newer.seen == {}
    assert [pt[0] for pt in newer.points] == ["kept"]
    assert newer.forgets == {"gone", "earlier"}


def test_putting_back_into_a_full_queue_drops_the_oldest(monkeypatch):
    monkeypatch.setattr(wq, "QUEUE_POINTS", 3)
    newer = Batch()
    newer.add_points([point("n", 3), point("n", 4)])
    older = Batch()
    older.add_points([point("n", 1), point("n", 2)])
    assert newer.put_back(older) == 1
    assert [pt[1] for pt in newer.points] == [2, 3, 4]


# ---------------------------------------------------------------- the store


def test_an_unusable_state_dir_names_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        Store(str(blocker / "state"), 3600.0)
    assert str(info.value).startswith(f"{blocker / 'state' / 'rpicluster.db'}: cannot open")


def test_an_unreadable_nodes_table_names_the_file(state_dir):
    Store(str(state_dir), 3600.0).close()
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        db.execute("DROP TABLE nodes")
        db.execute("CREATE TABLE nodes (node_id TEXT)")
    store = Store(str(state_dir), 3600.0)
    with pytest.raises(StoreError, match="cannot read the nodes table"):
        store.load_nodes()
    store.close()


def test_nodes_load_in_registration_order_with_every_field(state_dir):
    store = Store(str(state_dir), 3600.0)
    store.start()
    store.save_nodes(
        [
            ("b", "pi-b", "10.0.0.2", '["basic"]', "left", 5.5, '{"k": 1}', '{"cpu": 2}', "{}"),
            ("a", "pi-a", "10.0.0.1", "[]", "dead", None, "{}", None, '{"r": {"count": 1}}'),
        ]
    )
    store.close()
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        db.execute(
            "INSERT INTO nodes VALUES ('bad', 'h', 'a', 'not json', 'dead', 1, '{}', NULL, '{}')"
        )
    store = Store(str(state_dir), 3600.0)
    assert store.load_nodes() == [
        {
            "node_id": "b",
            "hostname": "pi-b",
            "address": "10.0.0.2",
            "roles": ["basic"],
            "state": "left",
            "last_seen": 5.5,
            "details": {"k": 1},
            "vitals": {"cpu": 2},
            "action_errors": {},
        },
        {
            "node_id": "a",
            "hostname": "pi-a",
            "address": "10.0.0.1",
            "roles": [],
            "state": "dead",
            "last_seen": None,
            "details": {},
            "vitals": None,
            "action_errors": {"r": {"count": 1}},
        },
    ]
    store.close()


def test_empty_hand_overs_are_not_writes(store):
    store.save_nodes([])
    store.save_last_seen([])
    store.add_vitals([])
    health = store.health()
    assert health["lag_seconds"] == 0.0 and health["pending_rows"] == 0
    assert store._pending.since is None


def test_health_of_a_fresh_store_and_one_never_started(state_dir):
    idle = Store(str(state_dir / "idle"), 3600.0)
    assert idle.health()["error"] == "the database writer is not running"
    assert idle.health()["ok"] is False
    idle.close()
    store = Store(str(state_dir), 3600.0)
    store.start()
    assert store.health() == {
        "ok": True,
        "error": None,
        "queue": 0,
        "queue_limit": 20000,
        "queue_bytes": 0,
        "queue_bytes_limit": 16 * 1024 * 1024,
        "pending_rows": 0,
        "lag_seconds": 0.0,
        "dropped_total": 0,
        "rejected_total": 0,
        "write_errors_total": 0,
    }
    store.close()
    assert store.health()["error"] == "the database writer is not running"


def test_last_seen_updates_reach_the_file(store, state_dir):
    store.save_nodes([node_row("a", last_seen=1.0), node_row("b", last_seen=1.0)])
    store.save_last_seen([(7.5, "a"), (8.5, "a")])
    assert written(store)
    assert db_rows(state_dir, "SELECT node_id, last_seen FROM nodes ORDER BY node_id") == [
        ("a", 8.5),
        ("b", 1.0),
    ]


def test_a_forgotten_node_loses_its_row_and_history(store, state_dir):
    store.save_nodes([node_row("a"), node_row("b")])
    store.add_vitals([point("a", 1.0), point("b", 2.0)])
    assert written(store)
    store.forget("a")
    store.add_vitals([point("a", 3.0)])  # came after the forget: a new node's point
    assert written(store)
    assert db_rows(state_dir, "SELECT node_id FROM nodes") == [("b",)]
    assert db_rows(state_dir, "SELECT node_id, ts FROM vitals ORDER BY ts") == [
        ("b", 2.0),
        ("a", 3.0),
    ]


def test_a_read_while_stopping_is_refused_at_once(state_dir):
    store = Store(str(state_dir), 3600.0)
    store.start()
    answers = []
    with store._cond:  # the writer cannot take the stop before this read is refused
        store._stopping = True
        store.read(lambda conn: 1, answers.append)
        store._stopping = False
    assert len(answers) == 1 and isinstance(answers[0], StoreError)
    assert str(answers[0]) == f"{store.path}: the master is stopping"
    store.close()


def test_a_read_gets_its_result_or_its_exception(store):
    results: list[Any] = []
    done = threading.Event()

    def keep(result: Any) -> None:
        results.append(result)
        if len(results) == 2:
            done.set()

    store.read(lambda conn: conn.execute("SELECT 41 + 1").fetchone()[0], keep)
    store.read(lambda conn: conn.execute("SELECT * FROM missing"), keep)
    assert done.wait(10)
    assert results[0] == 42 and isinstance(results[1], sqlite3.OperationalError)


def test_a_read_whose_hand_over_fails_is_logged_and_harms_nothing(store, caplog):
    caplog.set_level(logging.WARNING)

    def broken(result: Any) -> None:
        raise RuntimeError("Event loop is closed")

    store.read(lambda conn: 1, broken)
    assert written(store)
    assert (
        f"{store.path}: a read result could not be handed over:"
        " RuntimeError('Event loop is closed')"
    ) in [r.getMessage() for r in caplog.records]
    assert store.health()["ok"] is True


def test_dropped_points_are_logged_once_a_minute(store, monkeypatch, caplog):
    caplog.set_level(logging.ERROR)
    clock = [1000.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    store._drop_logged_at = -s.DROP_LOG_INTERVAL
    store._dropped(3, "the write queue is full")
    clock[0] += 59.5
    store._dropped(2, "the write queue is full")
    clock[0] += 0.5
    store._dropped(1, "the write queue is full")
    lines = [r.getMessage() for r in caplog.records if "vitals points dropped" in r.getMessage()]
    assert lines == [
        f"{store.path}: 3 vitals points dropped (3 in all): the write queue is full",
        f"{store.path}: 1 vitals points dropped (6 in all): the write queue is full",
    ]
    assert store.dropped_total == 6


def test_health_reports_recent_drops_for_lag_limit_seconds(store, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    store._dropped(1, "the write queue is full")
    clock[0] += 29.5
    assert store.health()["error"] == ("vitals points dropped in the last 30 s (write queue full)")
    clock[0] += 0.5
    assert store.health()["ok"] is True


def test_health_reports_lag_past_thirty_seconds(store, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    store._pending.since = 990.0
    store._inflight_since = 975.0
    health = store.health()
    assert health["lag_seconds"] == 25.0 and health["ok"] is True
    clock[0] = 1005.0
    assert store.health()["ok"] is True  # exactly 30 s is not yet behind
    clock[0] = 1005.5
    assert store.health()["error"] == "writes are 30 s behind"
    store._pending.since = store._inflight_since = None


# ---------------------------------------------------------------- history


def fill(state_dir: Path, points: list[tuple[str, float, str]]) -> sqlite3.Connection:
    store = Store(str(state_dir), FOREVER)
    store.start()
    store.add_vitals(points)
    store.close()
    return sqlite3.connect(state_dir / "rpicluster.db")


def test_history_reads_stop_at_exactly_their_budget(state_dir):
    conn = fill(state_dir, [point("n", t, size=10) for t in range(1, 6)])
    # k points of 10 bytes cost 2 + k * 11 bytes of budget
    assert read_history(conn, "n", None, 100, 2 + 3 * 11) == (
        "[" + ",".join([point("n", 0)[2]] * 3) + "]",
        True,
    )
    text, more = read_history(conn, "n", None, 100, 2 + 3 * 11 - 1)
    assert len(json.loads(text)) == 2 and more
    text, more = read_history(conn, "n", None, 100, 2 + 5 * 11)
    assert len(json.loads(text)) == 5 and not more
    conn.close()


def test_history_reads_stop_at_exactly_their_limit(state_dir):
    conn = fill(state_dir, [point("n", t) for t in range(1, 6)] + [point("m", 3)])
    assert read_history(conn, "n", None, 5, 10**6)[1] is False
    text, more = read_history(conn, "n", None, 4, 10**6)
    assert len(json.loads(text)) == 4 and more
    assert read_history(conn, "n", 3.0, 10, 10**6)[0].count("{") == 2  # after ts 3 only
    assert read_history(conn, "n", 5.0, 10, 10**6) == ("[]", False)
    assert read_history(conn, "x", None, 10, 10**6) == ("[]", False)
    conn.close()


def test_history_without_since_includes_every_point(state_dir):
    conn = fill(state_dir, [point("n", 0.0), point("n", -0.5), point("n", -1.5)])
    text, _ = read_history(conn, "n", None, 10, 10**6)
    assert len(json.loads(text)) == 3
    conn.close()


# ------------------------------------------------------------ prune and trim


def test_the_first_prune_scans_everything_and_later_ones_each_known_node(state_dir, monkeypatch):
    now = [10_000.0]
    monkeypatch.setattr(s.time, "time", lambda: now[0])
    store = Store(str(state_dir), 100.0)
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        # an orphan's old points (no nodes row): only the first full scan finds them
        db.executemany("INSERT INTO vitals VALUES (?, ?, ?)", [("orphan", 1.0, "{}")])
    store.start()
    store.save_nodes([node_row("a")])
    store.add_vitals([point("a", 9_899.0), point("a", 9_900.0), point("a", 9_970.0)])
    assert written(store)
    assert db_rows(state_dir, "SELECT node_id, ts FROM vitals ORDER BY ts") == [
        ("a", 9_900.0),
        ("a", 9_970.0),
    ]
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        db.executemany(
            "INSERT INTO vitals VALUES (?, ?, ?)", [("orphan", 2.0, "{}"), ("a", 5.0, "{}")]
        )
    now[0] += 59.0  # not yet a minute: no prune
    store.add_vitals([point("a", 10_000.0)])
    assert written(store)
    assert len(db_rows(state_dir, "SELECT * FROM vitals")) == 5
    now[0] += 1.0
    store.add_vitals([point("a", 10_001.0)])
    assert written(store)
    # a known node's old point is gone; the orphan's is left for the next full scan
    assert db_rows(state_dir, "SELECT node_id, ts FROM vitals ORDER BY ts") == [
        ("orphan", 2.0),
        ("a", 9_970.0),
        ("a", 10_000.0),
        ("a", 10_001.0),
    ]
    store.close()


def test_a_node_is_trimmed_to_its_cap_at_its_first_points_and_every_512_after(
    state_dir, monkeypatch
):
    monkeypatch.setattr(s, "POINTS_PER_NODE", 600)
    monkeypatch.setattr(s.time, "time", lambda: 0.0)  # no point is older than the window
    store = Store(str(state_dir), 1.0)  # cap 600: trimmed to 600 - 512 = 88 when checked
    store.start()
    store.add_vitals([point("n", t) for t in range(1, 101)])
    assert written(store)
    count = "SELECT COUNT(*) FROM vitals WHERE node_id = 'n'"
    assert db_rows(state_dir, count) == [(88,)]
    assert db_rows(state_dir, "SELECT MIN(ts) FROM vitals") == [(13.0,)]  # the newest kept
    store.add_vitals([point("n", t) for t in range(101, 101 + 511)])
    assert written(store)
    assert db_rows(state_dir, count) == [(88 + 511,)]  # 511 since the check: not yet
    store.add_vitals([point("n", 1000.0)])
    assert written(store)
    assert db_rows(state_dir, count) == [(88,)]
    store.close()


def test_the_store_survives_a_writer_bug_and_retries(state_dir, monkeypatch, caplog):
    store = Store(str(state_dir), FOREVER)
    calls = collections.Counter()
    real = store._transaction
    bug = KeyError("b" * 300)

    def buggy(batch, prune):
        calls["n"] += 1
        if calls["n"] == 1:
            raise bug
        return real(batch, prune)

    monkeypatch.setattr(store, "_transaction", buggy)
    monkeypatch.setattr(s, "RETRY_MIN", 60.0)  # the retry waits: the error stays to be seen
    store.start()
    store.save_nodes([node_row("a")])
    wait_for(lambda: calls["n"] == 1, what="the buggy write")
    wait_for(lambda: store.health()["error"] is not None, what="the error reported")
    assert store.health()["error"] == f"unexpected failure: {bug!r}"[:200]
    assert f"{store.path}: unexpected failure writing a batch" in [
        r.getMessage() for r in caplog.records
    ]
    store.close()  # saves the row that failed
    assert db_rows(state_dir, "SELECT node_id FROM nodes") == [("a",)]


# ----------------------------------------------- what the first mutation run found


def test_forgetting_the_only_node_with_queued_points_drops_them():
    batch = Batch()
    batch.add_points([point("a", 1), point("a", 2)])
    batch.forget("a")
    assert list(batch.points) == [] and batch.point_bytes == 0


def test_take_oldest_stops_at_exactly_the_transaction_bytes(monkeypatch):
    monkeypatch.setattr(wq, "TXN_BYTES", 20)
    batch = Batch()
    batch.add_points([point("n", t) for t in range(5)])
    assert [pt[1] for pt in batch.take_oldest().points] == [0, 1]


def test_a_corrupt_row_is_skipped_with_its_node_id_logged(state_dir, caplog):
    Store(str(state_dir), 3600.0).close()
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        db.execute(
            "INSERT INTO nodes VALUES ('bad', 'h', 'a', 'not json', 'dead', 1, '{}', NULL, '{}')"
        )
    store = Store(str(state_dir), 3600.0)
    assert store.load_nodes() == []
    assert [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()] == [
        f"{store.path}: skipping node 'bad' with a corrupt row"
    ]
    store.close()


def test_a_full_queue_says_why_it_drops(state_dir, monkeypatch, caplog):
    caplog.set_level(logging.ERROR)
    monkeypatch.setattr(wq, "QUEUE_POINTS", 2)
    store = Store(str(state_dir), FOREVER)  # not started: the queue only fills
    store.add_vitals([point("n", t) for t in range(3)])
    assert [r.getMessage() for r in caplog.records] == [
        f"{store.path}: 1 vitals points dropped (1 in all): the write queue is full"
    ]
    store.close()


def test_forget_is_logged_with_the_node(store, caplog):
    caplog.set_level(logging.INFO, logger=s.log.name)
    store.forget("pi-7")
    assert f"{store.path}: node pi-7 and its history queued for deletion" in [
        r.getMessage() for r in caplog.records
    ]


def test_a_read_on_a_store_never_started_is_refused_at_once(state_dir):
    store = Store(str(state_dir), 3600.0)
    answers: list[Any] = []
    store.read(lambda conn: 1, answers.append)
    assert [str(a) for a in answers] == [f"{store.path}: the database writer is not running"]
    assert isinstance(answers[0], StoreError)
    store.close()


def test_health_gives_the_lag_to_the_millisecond(store, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    store._pending.since = 998.76544
    assert store.health()["lag_seconds"] == 1.235
    store._pending.since = None


class FailingTransactions:
    """Stands in for Store._transaction: fails ``failures`` times, then writes."""

    def __init__(self, store: Store, failures: int, message: str = "disk I/O error") -> None:
        self.real = store._transaction
        self.failures = failures
        self.message = message
        self.calls: list[bool] = []

    def __call__(self, batch: Batch, prune: bool) -> None:
        self.calls.append(bool(prune))  # what the writer means, whatever false value it passes
        if len(self.calls) <= self.failures:
            raise sqlite3.OperationalError(self.message)
        self.real(batch, prune)


def test_a_failed_write_is_not_retried_in_place_and_loses_nothing(state_dir, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(str(state_dir), FOREVER)
    assert store._save(Batch()) is True
    assert caplog.records == []  # no failure before: nothing "succeeds again"
    failing = FailingTransactions(store, failures=2)
    monkeypatch.setattr(store, "_transaction", failing)
    batch = Batch()
    batch.nodes["a"] = node_row("a")
    batch.add_points([point("n", 1.0), point("n", 2.0)])
    assert store._save(batch) is False
    assert store._save(batch) is False
    assert failing.calls == [False, False]  # one try each: the writer's backoff retries
    assert store.write_errors == 2 and store.dropped_total == 0
    assert store._error == "disk I/O error"
    # the same failure again is not logged again
    assert [r.getMessage() for r in caplog.records] == [
        f"{store.path}: write failed, 1 rows and 2 points kept for a retry: disk I/O error"
    ]
    assert store._save(batch) is True and store._error is None
    assert [r.getMessage() for r in caplog.records][1:] == [f"{store.path}: writes succeed again"]
    store.close()


def test_a_long_database_error_is_kept_to_200_characters(state_dir, monkeypatch):
    store = Store(str(state_dir), FOREVER)
    monkeypatch.setattr(store, "_transaction", FailingTransactions(store, 1, "e" * 300))
    assert store._save(Batch()) is False
    assert store._error == "e" * 200
    store.close()


def test_the_final_write_retries_for_three_seconds_doubling_then_counts_the_loss(
    state_dir, monkeypatch, caplog
):
    caplog.set_level(logging.ERROR)
    clock = [500.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(s.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    store = Store(str(state_dir), FOREVER)
    failing = FailingTransactions(store, failures=100)
    monkeypatch.setattr(store, "_transaction", failing)
    batch = Batch()
    batch.nodes["a"] = node_row("a")
    batch.add_points([point("n", 1.0), point("n", 2.0)])
    assert store._save(batch, final=True) is False
    # tries at 0, 0.1, 0.3, 0.7 and 1.5 s; the next (after 1.6 s more) would pass 3 s
    assert len(failing.calls) == 5 and all(failing.calls)
    assert clock[0] == pytest.approx(501.5)
    assert store.dropped_total == 2
    messages = [r.getMessage() for r in caplog.records]
    assert f"{store.path}: 1 node rows not saved at shutdown" in messages
    assert any(
        "2 vitals points dropped (2 in all): the database failed at shutdown" in m for m in messages
    )
    monkeypatch.undo()
    store.close()


def test_the_final_write_prunes_even_within_the_minute(state_dir, monkeypatch):
    now = [10_000.0]
    monkeypatch.setattr(s.time, "time", lambda: now[0])
    store = Store(str(state_dir), 100.0)
    store.start()
    store.add_vitals([point("a", 9_910.0)])
    assert written(store)
    now[0] += 30.0  # the point is now older than the window; the last prune was 30 s ago
    store.close()
    assert db_rows(state_dir, "SELECT ts FROM vitals") == []


def rows_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rows repaired" in r.getMessage()]


def test_row_by_row_names_what_it_repaired_and_refused(store, state_dir, caplog):
    caplog.set_level(logging.WARNING)
    store.save_nodes(
        [
            node_row("surrogate")[:1] + ("pi\ud800",) + node_row("x")[2:],
            node_row("both")[:1]
            + ("pi\udc00",)
            + node_row("x")[2:5]
            + (2**70,)
            + node_row("x")[6:],
            node_row("huge", last_seen=2**70),
            node_row("fine"),
        ]
    )
    assert written(store)
    assert rows_logged(caplog) == [
        f"{store.path}: 1 rows repaired (invalid UTF-8 replaced), 2 refused"
        " (first: OverflowError: Python int too large to convert to SQLite INTEGER)"
    ]
    assert sorted(r[0] for r in db_rows(state_dir, "SELECT node_id FROM nodes")) == [
        "fine",
        "surrogate",
    ]
    health = store.health()
    assert health["rejected_total"] == 2
    assert store.repaired_total == 1


def test_row_by_row_logs_repairs_alone_too(store, caplog):
    caplog.set_level(logging.WARNING)
    store.save_nodes([node_row("s")[:1] + ("pi\ud800",) + node_row("x")[2:]])
    assert written(store)
    assert rows_logged(caplog) == [
        f"{store.path}: 1 rows repaired (invalid UTF-8 replaced), 0 refused"
    ]


def test_the_writer_is_a_named_daemon_thread(store):
    """Named for ps/py-spy; a daemon, so a master that dies without close() still exits."""
    writers = [t for t in threading.enumerate() if t.name == "rpicluster-store"]
    assert writers == [store._thread] and writers[0].daemon is True


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_writer_killed_says_so_and_fails_the_reads_waiting(state_dir, monkeypatch, caplog):
    store = Store(str(state_dir), FOREVER)

    def killed() -> None:
        with store._cond:
            store._cond.wait_for(lambda: len(store._pending.reads) == 2)
        raise SystemExit("killed")

    monkeypatch.setattr(store, "_work", killed)
    store.start()
    answers: list[Any] = []

    def first(result: Any) -> None:
        answers.append(result)
        raise RuntimeError("Event loop is closed")  # a failing hand-over stops nobody

    store.read(lambda conn: 1, first)
    store.read(lambda conn: 2, answers.append)
    store._thread.join(10)
    assert [str(a) for a in answers] == [f"{store.path}: the database writer stopped"] * 2
    assert f"{store.path}: database writer stopped: SystemExit('killed')" in [
        r.getMessage() for r in caplog.records
    ]
    late: list[Any] = []
    store.read(lambda conn: 3, late.append)
    assert str(late[0]) == f"{store.path}: the database writer is not running"
    store.close()


def test_reads_and_stop_are_not_held_up_by_a_write_backoff(state_dir, monkeypatch):
    monkeypatch.setattr(s, "RETRY_MIN", 60.0)  # a failed write waits a minute to retry
    store = Store(str(state_dir), FOREVER)
    failing = FailingTransactions(store, failures=1)
    monkeypatch.setattr(store, "_transaction", failing)
    store.start()
    store.save_nodes([node_row("a")])
    wait_for(lambda: len(failing.calls) == 1, what="the first write failed")
    assert written(store)  # answered during the backoff, long before the retry
    assert len(failing.calls) == 1
    store.close()  # stops at once too, and saves the row
    assert db_rows(state_dir, "SELECT node_id FROM nodes") == [("a",)]


class CommitFails:
    """The writer's connection, whose next COMMIT (or INSERT) fails once."""

    def __init__(self, conn: sqlite3.Connection, on: str) -> None:
        self.conn = conn
        self.on = on
        self.failed = False

    def execute(self, sql: str, *args: Any) -> Any:
        if not self.failed and sql.upper().startswith(self.on.upper()):  # SQL ignores case
            self.failed = True
            if self.on == "COMMIT":
                self.conn.execute("ROLLBACK")  # as SQLite does on a failed commit
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        if not self.failed and sql.upper().startswith(self.on.upper()):
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.executemany(sql, rows)

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("on", ["COMMIT", "INSERT OR REPLACE"])
def test_a_write_failing_inside_its_transaction_is_rolled_back_and_retried(
    state_dir, monkeypatch, on
):
    monkeypatch.setattr(s, "RETRY_MIN", 0.01)
    store = Store(str(state_dir), FOREVER)
    store._conn = CommitFails(store._conn, on)
    store.start()
    store.save_nodes([node_row("a")])
    # The failure is raised before the writer counts it, and health is ok until
    # then: await the count, then the retry that clears the error.
    wait_for(lambda: store.write_errors >= 1, what="the failed write counted")
    wait_for(lambda: store.health()["ok"], what="the retry succeeded")
    assert store._conn.failed and store.write_errors == 1
    store.close()
    assert db_rows(state_dir, "SELECT node_id FROM nodes") == [("a",)]


def test_a_forgotten_node_starts_its_trim_count_over(state_dir, monkeypatch, caplog):
    monkeypatch.setattr(s, "POINTS_PER_NODE", 600)
    monkeypatch.setattr(s.time, "time", lambda: 0.0)  # no point is older than the window
    store = Store(str(state_dir), 1.0)  # cap 600: trimmed to 88 when checked
    store.start()
    count = "SELECT COUNT(*) FROM vitals WHERE node_id = 'n'"
    store.add_vitals([point("n", t) for t in range(1, 101)])
    assert written(store) and db_rows(state_dir, count) == [(88,)]
    store.forget("never-seen")  # a node without points: nothing to reset, no failure
    store.forget("n")
    assert written(store)
    store.add_vitals([point("n", t) for t in range(1, 101)])
    assert written(store)
    assert db_rows(state_dir, count) == [(88,)]  # checked at its first points again
    assert store.health()["ok"] is True
    assert not [r for r in caplog.records if "unexpected failure" in r.getMessage()]
    store.close()


def test_the_trim_count_adds_up_over_batches(state_dir, monkeypatch):
    monkeypatch.setattr(s, "POINTS_PER_NODE", 600)
    monkeypatch.setattr(s.time, "time", lambda: 0.0)
    store = Store(str(state_dir), 1.0)
    store.start()
    count = "SELECT COUNT(*) FROM vitals WHERE node_id = 'n'"
    store.add_vitals([point("n", t) for t in range(1, 101)])
    assert written(store) and db_rows(state_dir, count) == [(88,)]
    stored = 88
    for batch in range(3):  # 200, 400, then 600 points since the check: trimmed at the third
        store.add_vitals([point("n", 1000 + batch * 200 + t) for t in range(200)])
        assert written(store)
        stored += 200
        if batch < 2:
            assert db_rows(state_dir, count) == [(stored,)]
    assert db_rows(state_dir, count) == [(88,)]
    store.close()


def test_repair_and_refusal_totals_add_up_over_batches(store, caplog):
    caplog.set_level(logging.WARNING)
    store.save_nodes([node_row("s")[:1] + ("pi\ud800",) + node_row("x")[2:]])
    assert written(store)
    store.save_nodes([node_row("huge", last_seen=2**70)])
    assert written(store)
    assert rows_logged(caplog)[-1] == (
        f"{store.path}: 0 rows repaired (invalid UTF-8 replaced), 1 refused"
        " (first: OverflowError: Python int too large to convert to SQLite INTEGER)"
    )
    store.save_nodes([node_row("fine")])
    assert written(store)
    assert (store.repaired_total, store.rejected_total) == (1, 1)
    assert store.health()["rejected_total"] == 1


def test_a_failed_batch_put_back_into_a_full_queue_drops_the_oldest_and_says_why(
    state_dir, monkeypatch, caplog
):
    caplog.set_level(logging.ERROR)
    monkeypatch.setattr(wq, "QUEUE_POINTS", 3)
    monkeypatch.setattr(s, "RETRY_MIN", 0.01)
    store = Store(str(state_dir), FOREVER)
    real = store._transaction
    calls: list[int] = []

    def fails_while_the_queue_fills(batch: Batch, prune: bool) -> None:
        calls.append(len(batch.points))
        if len(calls) == 1:
            store.add_vitals([point("n", t) for t in (4.0, 5.0, 6.0)])  # full again meanwhile
            raise sqlite3.OperationalError("disk I/O error")
        real(batch, prune)

    monkeypatch.setattr(store, "_transaction", fails_while_the_queue_fills)
    store.add_vitals([point("n", t) for t in (1.0, 2.0, 3.0)])
    store.start()
    wait_for(
        lambda: db_rows(state_dir, "SELECT ts FROM vitals ORDER BY ts") == [(4.0,), (5.0,), (6.0,)],
        what="the newest three points saved by the retry",
    )
    assert calls[0] == 3 and store.dropped_total == 3
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        f"{store.path}: 3 vitals points dropped (3 in all): the write queue is full"
    ]
    store.close()


class InstantBackoff(threading.Condition):
    """The writer's condition on the test's clock: a wait with a limit does not wait, the
    clock moves on by the limit (so each backoff the writer chose is recorded)."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait_for(self, predicate: Any, timeout: Any = None) -> Any:
        if timeout is None:
            return super().wait_for(predicate)
        self.waits.append(timeout)
        self.clock[0] += timeout
        return predicate()


def test_failed_writes_back_off_doubling_from_half_a_second_to_thirty(state_dir, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    store = Store(str(state_dir), FOREVER)
    backoff = store._cond = InstantBackoff(clock)
    failing = FailingTransactions(store, failures=8)
    saved = threading.Event()

    def transaction(batch: Batch, prune: bool) -> None:
        failing(batch, prune)
        saved.set()  # only once a write went through

    monkeypatch.setattr(store, "_transaction", transaction)
    store.save_nodes([node_row("a")])
    store.start()
    assert saved.wait(10)
    assert backoff.waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert store.write_errors == 8
    store.close()
    assert db_rows(state_dir, "SELECT node_id FROM nodes") == [("a",)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_read_while_a_dying_writer_fails_the_waiting_ones_is_refused_too(state_dir, monkeypatch):
    """The writer's thread is still alive while it hands out its failures: a read that comes
    then (here from the hand-over itself) must be refused, not queued for nobody."""
    store = Store(str(state_dir), FOREVER)

    def killed() -> None:
        with store._cond:
            store._cond.wait_for(lambda: store._pending.reads)
        raise SystemExit("killed")

    monkeypatch.setattr(store, "_work", killed)
    store.start()
    late: list[Any] = []
    store.read(lambda conn: 1, lambda result: store.read(lambda conn: 2, late.append))
    store._thread.join(10)
    assert [str(a) for a in late] == [f"{store.path}: the database writer is not running"]
    store.close()


def test_a_shutdown_on_a_failing_disk_makes_two_final_attempts_whatever_is_queued(
    state_dir, monkeypatch
):
    """The writer tries its batch once more, then leaves the rest to close(): each final
    attempt retries for 3 s, and close() waits 5 s for the writer, so the writer must not
    go on batch after batch. Every point queued is counted lost."""
    monkeypatch.setattr(s, "RETRY_MIN", 60.0)
    monkeypatch.setattr(s, "TXN_POINTS", 2)
    monkeypatch.setattr(wq, "TXN_POINTS", 2)
    store = Store(str(state_dir), FOREVER)
    failing = FailingTransactions(store, failures=1000)
    monkeypatch.setattr(store, "_transaction", failing)
    store.add_vitals([point("n", t) for t in range(1, 7)])  # three transactions' worth
    store.start()
    wait_for(lambda: len(failing.calls) == 1, what="the first write failed")
    clock = [1000.0]  # the final attempts' 3 s of retries without waiting them
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(s.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    store.close()
    assert failing.calls == [False] + [True] * 10  # the writer's final batch, then close()'s
    assert store.dropped_total == 6 and store._closed


def test_close_gives_up_on_a_stuck_writer_after_its_timeout_and_says_so(state_dir, caplog):
    caplog.set_level(logging.ERROR)
    store = Store(str(state_dir), FOREVER)
    store.start()
    inside, release = threading.Event(), threading.Event()

    def stuck(conn: sqlite3.Connection) -> bool:
        inside.set()
        return release.wait(10)

    store.read(stuck, lambda result: None)
    assert inside.wait(10)
    unstick = threading.Timer(5.0, release.set)  # a close() that waited for good returns then
    unstick.start()
    try:
        store.close(timeout=0.2)
        assert [r.getMessage() for r in caplog.records] == [
            f"{store.path}: writer did not finish within 0.2 s"
        ]
        assert not store._closed
    finally:
        unstick.cancel()
        release.set()
    store.close()  # the writer finishes now: this one closes the database
    assert store._closed


def test_close_of_a_store_whose_writer_never_ran_saves_as_a_final_write(state_dir, monkeypatch):
    clock = [500.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(s.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    store = Store(str(state_dir), FOREVER)
    failing = FailingTransactions(store, failures=2)
    monkeypatch.setattr(store, "_transaction", failing)
    store.save_nodes([node_row("a")])
    store.close()
    assert failing.calls == [True, True, True]  # retried, and pruning, as a final write does
    assert db_rows(state_dir, "SELECT node_id FROM nodes") == [("a",)]


def test_close_empties_the_journal_even_while_another_connection_has_the_file_open(state_dir):
    store = Store(str(state_dir), FOREVER)
    store.start()
    store.add_vitals([point("n", t) for t in range(100)])
    assert written(store)
    wal = state_dir / "rpicluster.db-wal"
    # e.g. sqlite3 run by hand on the master: idle, but SQLite's own checkpoint at the
    # last connection's close does not happen while it is open
    with contextlib.closing(sqlite3.connect(state_dir / "rpicluster.db")) as other:
        assert other.execute("SELECT COUNT(*) FROM vitals").fetchall() == [(100,)]
        assert wal.stat().st_size > 0
        store.close()
        assert wal.stat().st_size == 0


def test_a_second_close_does_not_touch_the_closed_database(state_dir, caplog):
    store = Store(str(state_dir), FOREVER)
    store.start()
    store.close()
    caplog.set_level(logging.WARNING)
    store.save_nodes([node_row("late")])
    store.close()
    assert caplog.records == [] and store.write_errors == 0


def test_the_first_drop_is_logged_even_in_the_first_minute_after_boot(
    state_dir, monkeypatch, caplog
):
    caplog.set_level(logging.ERROR)
    monkeypatch.setattr(s.time, "monotonic", lambda: 5.0)  # seconds since boot on Linux
    store = Store(str(state_dir), FOREVER)
    store._dropped(2, "the write queue is full")
    assert [r.getMessage() for r in caplog.records] == [
        f"{store.path}: 2 vitals points dropped (2 in all): the write queue is full"
    ]
    store.close()


def test_close_closes_the_database_even_when_the_last_checkpoint_fails(state_dir):
    store = Store(str(state_dir), FOREVER)
    store.start()
    store.save_nodes([node_row("a")])
    assert written(store)
    real = store._conn
    store._conn = CommitFails(real, "PRAGMA wal_checkpoint")
    store.close()  # a disk failing at the very end does not make close() raise
    assert store._conn.failed and store._closed
    with pytest.raises(sqlite3.ProgrammingError):  # closed: the file is left to the next start
        real.execute("SELECT 1")
    assert db_rows(state_dir, "SELECT node_id FROM nodes") == [("a",)]


def test_a_new_write_failure_is_logged_at_once_and_a_different_one_again(
    state_dir, monkeypatch, caplog
):
    caplog.set_level(logging.ERROR)
    store = Store(str(state_dir), FOREVER)
    failing = FailingTransactions(store, failures=3)
    monkeypatch.setattr(store, "_transaction", failing)
    batch = Batch()
    batch.nodes["a"] = node_row("a")

    def logged() -> list[str]:
        return [r.getMessage().rsplit(": ", 1)[1] for r in caplog.records]

    assert store._save(batch) is False
    assert logged() == ["disk I/O error"]  # the first failure, not only a repeated one
    failing.message = "database or disk is full"
    assert store._save(batch) is False
    assert store._save(batch) is False
    assert logged() == ["disk I/O error", "database or disk is full"]
    store.close()


def test_the_final_write_makes_no_try_that_would_start_at_its_deadline(state_dir, monkeypatch):
    """Tries that take 0.375 s each: the fifth would start exactly 3 s after the first."""
    clock = [0.0]
    monkeypatch.setattr(s.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(s.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    store = Store(str(state_dir), FOREVER)
    failing = FailingTransactions(store, failures=100)

    def slow(batch: Batch, prune: bool) -> None:
        clock[0] += 0.375
        failing(batch, prune)

    monkeypatch.setattr(store, "_transaction", slow)
    batch = Batch()
    batch.nodes["a"] = node_row("a")
    assert store._save(batch, final=True) is False
    assert len(failing.calls) == 4 and clock[0] == 2.2  # the next would begin at 3.0
    monkeypatch.undo()
    store.close()


class RowsRefused:
    """The writer's connection, refusing every node row with a very long error text."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.upper().startswith("INSERT OR REPLACE INTO NODES"):
            raise ValueError("v" * 300)
        return self.conn.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        if sql.upper().startswith("INSERT OR REPLACE INTO NODES"):
            raise ValueError("v" * 300)
        return self.conn.executemany(sql, rows)

    def close(self) -> None:
        self.conn.close()


def test_a_refused_row_s_error_is_logged_to_120_characters(state_dir, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(str(state_dir), FOREVER)
    store._conn = RowsRefused(store._conn)
    batch = Batch()
    batch.nodes["a"] = node_row("a")
    assert store._save(batch) is True  # the batch is saved, its one row refused
    assert store.rejected_total == 1
    assert rows_logged(caplog) == [
        f"{store.path}: 0 rows repaired (invalid UTF-8 replaced), 1 refused"
        f" (first: ValueError: {'v' * 120})"
    ]
    store.close()
