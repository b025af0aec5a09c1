"""The master's store under a vitals flood: queue bound, drops, database and WAL size.

Drives :class:`rpicluster.master.store.Store` the way the master's event loop
does (a batch of points every FLUSH_INTERVAL, node rows, last-seen times every
minute), at a chosen rate from a chosen number of nodes, for a while. Reports
what the loop paid to hand each batch over (it must never wait on the disk),
the points written per second, the largest queue, the drops, the database and
WAL file sizes, the points kept per node against the cap, and the RSS.

    python -m bench.store_flood --nodes 10 --rate 20000 --seconds 30
    python -m bench.store_flood --nodes 10000 --rate 2000 --seconds 30   # 10,000 Pis at 5 s
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.master_load import cpu_pressure
from bench.report import append
from rpicluster.master.server import FLUSH_INTERVAL
from rpicluster.master.store import DB_NAME, Store


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10, help="nodes sending (10)")
    parser.add_argument("--rate", type=float, default=20000.0, help="points/s in all (20000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="flood duration (30)")
    parser.add_argument("--point-bytes", type=int, default=450, help="JSON per point (450)")
    parser.add_argument("--window", type=float, default=3600.0, help="history_window (3600)")
    parser.add_argument("--no-append", action="store_true", help="do not write results.md")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="rpicluster-store-flood-"))
    store = Store(str(workdir), args.window)
    store.start()
    db, wal = workdir / DB_NAME, workdir / (DB_NAME + "-wal")
    process = psutil.Process()
    ids = [f"node-{i:05d}-{'x' * 27}" for i in range(args.nodes)]
    pad = "x" * max(0, args.point_bytes - 60)
    per_flush = max(1, round(args.rate * FLUSH_INTERVAL))
    handover: list[float] = []
    max_queue = max_wal = max_rss = 0
    sent = 0
    began = time.monotonic()
    next_flush = began
    last_seen_at = began
    store.save_nodes(
        [(n, "pi", "10.0.0.1", '["vitals"]', "alive", 0.0, "{}", None, "{}") for n in ids]
    )
    while time.monotonic() - began < args.seconds:
        now = time.time()
        points = []
        for k in range(per_flush):
            ts = now + k * 1e-6
            node_id = ids[(sent + k) % len(ids)]
            points.append((node_id, ts, json.dumps({"ts": ts, "cpu_percent": 3.5, "pad": pad})))
        t0 = time.perf_counter()
        store.add_vitals(points)
        if time.monotonic() - last_seen_at >= 60.0:
            store.save_last_seen([(now, n) for n in ids])
            last_seen_at = time.monotonic()
        handover.append(time.perf_counter() - t0)
        sent += per_flush
        health = store.health()
        max_queue = max(max_queue, health["queue"])
        max_wal = max(max_wal, size(wal))
        max_rss = max(max_rss, process.memory_info().rss)
        next_flush += FLUSH_INTERVAL
        time.sleep(max(0.0, next_flush - time.monotonic()))
    elapsed = time.monotonic() - began
    health = store.health()
    t0 = time.monotonic()
    store.close(60.0)
    close_s = time.monotonic() - t0
    conn = sqlite3.connect(str(db))
    stored = conn.execute("SELECT COUNT(*) FROM vitals").fetchone()[0]
    most = conn.execute(
        "SELECT MAX(c) FROM (SELECT COUNT(*) AS c FROM vitals GROUP BY node_id)"
    ).fetchone()[0]
    conn.close()
    ms = sorted(1000 * h for h in handover)
    lines = [
        f"flood: {args.nodes} nodes, {args.rate:g} points/s in all ({per_flush} per"
        f" {FLUSH_INTERVAL:g} s flush), {args.point_bytes} B per point, {elapsed:.1f} s,"
        f" history_window {args.window:g} s (cap {store.points_cap} points per node);"
        f" CPU pressure (PSI avg60) {cpu_pressure()} (machine shared, loaded)",
        f"hand-over per flush on the loop thread: median {statistics.median(ms):.2f} ms,"
        f" max {ms[-1]:.2f} ms",
        f"points sent {sent}, stored at the end {stored}, dropped {health['dropped_total']},"
        f" largest queue {max_queue} (limit {health['queue_limit']}); most points of one node"
        f" {most}",
        f"database {size(db) / 1e6:.1f} MB after close; WAL peak {max_wal / 1e6:.1f} MB,"
        f" {size(wal) / 1e6:.1f} MB after close; store ok at the end: {health['ok']}"
        f" (error {health['error']!r}, lag {health['lag_seconds']} s); close took {close_s:.2f} s",
        f"bench process RSS peak {max_rss / 1e6:.1f} MB",
    ]
    if args.no_append:
        print("\n".join(lines))
    else:
        append(f"store_flood: {args.nodes} nodes at {args.rate:g} points/s", lines)
    for path in workdir.iterdir():
        path.unlink()
    workdir.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
