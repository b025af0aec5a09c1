"""What the alert rules cost the master's event loop (rpicluster/master/alerts.py).

Builds a real :class:`Registry` of N nodes with vitals, then times what the
master runs every second (:func:`rpicluster.master.upkeep.evaluate_alerts`):
the first look at every node, a second in which 1/interval of the nodes sent
vitals (the steady state), and a second with nothing new. Some nodes are hot or
dead, so rules fire too.

    python -m bench.alerts --nodes 10000 --vitals-interval 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Any

from bench.master_load import cpu_pressure
from bench.report import append
from rpicluster.config import AlertSettings
from rpicluster.master import upkeep
from rpicluster.master.alerts import AlertEngine
from rpicluster.master.counters import LogLimiter
from rpicluster.master.registry import Registry

VITALS = {
    "temperature": 51.0,
    "throttled": 0,
    "under_voltage_alarm": 0,
    "disk_free": 5e9,
    "disk_total": 3e10,
    "cpu_percent": 3.0,
    "load_1": 0.2,
}


class _Conn:
    def close(self, *args: Any) -> None:
        pass


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000, help="nodes (10000)")
    parser.add_argument("--vitals-interval", type=float, default=5.0, help="seconds (5)")
    parser.add_argument("--rounds", type=int, default=20, help="steady seconds timed (20)")
    parser.add_argument("--no-append", action="store_true", help="do not write results.md")
    args = parser.parse_args(argv)

    registry = Registry(2.5, 5.0)
    sessions = []
    for i in range(args.nodes):
        session, _ = registry.register(
            f"n{i}", "vitals", "10.0.0.1", {"hostname": f"pi-{i}"}, _Conn()
        )
        vitals = dict(VITALS, temperature=85.0) if i % 100 == 0 else dict(VITALS)
        registry.vitals(session, vitals)
        sessions.append(session)
    for session in sessions[1::100]:  # 1 % dead: their connections closed
        registry.disconnect(session, goodbye=False)
    sessions = [s for i, s in enumerate(sessions) if i % 100 != 1]  # the living report
    master = SimpleNamespace(
        registry=registry,
        alerts=AlertEngine(AlertSettings(hold=0), "bench"),
        store=None,
        clock=time.monotonic,
        webhook=None,
        log_alerts=LogLimiter("alert notifications", limit=0),
    )
    t0 = time.perf_counter()
    upkeep.evaluate_alerts(master)
    first = (time.perf_counter() - t0) * 1000
    per_second = max(1, round(args.nodes / args.vitals_interval))
    steady, idle = [], []
    offset = 0
    for _ in range(args.rounds):
        for k in range(per_second):
            session = sessions[(offset + k) % len(sessions)]
            registry.vitals(session, dict(VITALS))
        offset += per_second
        t0 = time.perf_counter()
        upkeep.evaluate_alerts(master)
        steady.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        upkeep.evaluate_alerts(master)
        idle.append((time.perf_counter() - t0) * 1000)
    summary = master.alerts.summary()
    lines = [
        f"{args.nodes} nodes, vitals every {args.vitals_interval:g} s ({per_second} changed a"
        f" second), 1 % hot and 1 % dead; CPU pressure (PSI avg60) {cpu_pressure()}",
        f"first evaluation (every node): {first:.1f} ms",
        f"a steady second: median {statistics.median(steady):.2f} ms, max {max(steady):.2f} ms;"
        f" a second with nothing new: median {statistics.median(idle):.3f} ms",
        f"alerts at the end: {summary['firing_count']} firing (the dead nodes, dead before the"
        f" first look: shown, not sent), {summary['fired_total']} fired and"
        f" {summary['resolved_total']} resolved (the hot nodes, cooled by their next reading)",
    ]
    if args.no_append:
        print("\n".join(lines))
    else:
        append(f"alerts: rule evaluation with {args.nodes} nodes", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
