"""Benchmark: the master under N simulated slaves heartbeating at an interval.

Starts the master as its own process on 127.0.0.1, launches N simulated slaves
(``bench.simslaves``) over several processes, waits until the master counts all
of them alive, then measures over ``--duration`` seconds: the master's CPU (% of
one core) and RSS with psutil, and every heartbeat's round trip as the slaves see
it. Targets (issue 2, 2 cores): 10,000 slaves at 1 heartbeat/s, master <= 50 % of
one core and <= 128 MB RSS, round trip p99 < 50 ms, all registered within 30 s,
not one marked dead.

    python -m bench.master_load --slaves 10000 --interval 1 --duration 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import memmap, report
from bench.simslaves import (
    SECRET,
    Fleet,
    MasterProcess,
    dial,
    enable_tls,
    free_port,
    percentile,
    query_cluster,
    raise_nofile,
    temp_state_dir,
    write_config,
)
from rpicluster import protocol as p

MB = 1024 * 1024


def master_info(port: int) -> dict[str, Any]:
    """The master dict (node counts by state, counters) from one small ``cluster`` page."""
    with contextlib.closing(dial(port, 60)) as sock:
        p.client_handshake(sock, SECRET, kind=p.KIND_CLIENT, node_id="bench-poll", role="-")
        p.send_frame(sock, p.make(p.QUERY, id=1, what="cluster", limit=1))
        reply = p.recv_message(sock)
        return reply["data"]["master"]


def counts(port: int) -> dict[str, int]:
    """Node counts by state; empty when the master is too busy to answer within 60 s."""
    try:
        return master_info(port)["nodes"]
    except (OSError, p.ProtocolError):
        return {}


def safe_counters(port: int) -> dict[str, int]:
    """The master's counters; empty when it is too busy to answer within 60 s."""
    try:
        return master_info(port)["counters"]
    except (OSError, p.ProtocolError):
        return {}


def cpu_pressure() -> str:
    """Linux PSI: share of the last 60 s some task waited for a CPU (the machine's noise)."""
    try:
        with open("/proc/pressure/cpu") as psi:
            fields = dict(f.split("=") for f in psi.readline().split()[1:])
        return f"{float(fields['avg60']):.0f} %"
    except (OSError, KeyError, ValueError):
        return "n/a"


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slaves", type=int, default=10000, help="simulated slaves (10000)")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, s (1)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (20)")
    parser.add_argument("--processes", type=int, default=3, help="slave processes (3)")
    parser.add_argument(
        "--ramp", type=float, default=15.0, help="first connects spread over, s (15)"
    )
    parser.add_argument("--no-append", action="store_true", help="do not write results.md")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the master and slave processes (0; negative needs root)",
    )
    parser.add_argument(
        "--master-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the master alone (repeatable), e.g. MALLOC_ARENA_MAX=1",
    )
    parser.add_argument("--keep", action="store_true", help="keep the master's state dir and log")
    parser.add_argument(
        "--tls", action="store_true", help="TLS with a cluster CA, a certificate per slave"
    )
    args = parser.parse_args(argv)

    raise_nofile(4096)
    load_before = os.getloadavg()[0]
    state_dir = temp_state_dir()
    port = free_port()
    if args.tls:
        enable_tls(f"{state_dir}/pki", [f"sim-{i:05d}" for i in range(args.slaves)])
    config = write_config(state_dir, port, heartbeat_interval=args.interval)
    master_env = dict(item.split("=", 1) for item in args.master_env if "=" in item)
    master = MasterProcess(config, f"{state_dir}/master.log", port, nice=args.nice, env=master_env)
    fleet = Fleet(port, args.slaves, args.interval, args.processes, ramp=args.ramp, nice=args.nice)
    lines: list[str] = []
    try:
        master.start()
        rss_idle = master.rss()
        cpu0, t0 = master.cpu_seconds(), time.monotonic()
        fleet.start()
        launched = time.monotonic()
        rss_max = 0
        registered_after = None
        while time.monotonic() - launched < 60:
            rss_max = max(rss_max, master.rss())
            state = counts(port)
            if state.get("alive", 0) >= args.slaves:
                registered_after = time.monotonic() - launched
                break
            time.sleep(0.25)
        join_cpu = (master.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 100
        join_fleet = fleet.cpu_seconds() / (time.monotonic() - t0) * 100
        if registered_after is None:
            print(f"only {state} after 60 s; measuring anyway")
        time.sleep(2.0)  # settle: every slave has sent a few heartbeats
        fleet.measure.set()
        msgs_a = safe_counters(port).get("messages_total", 0)
        sched_a = master.sched()
        cpu_a, fleet_a, t_a = master.cpu_seconds(), fleet.cpu_seconds(), time.monotonic()
        rss_samples = []
        while time.monotonic() - t_a < args.duration:
            rss_samples.append(master.rss())
            time.sleep(0.5)
        cpu_b, fleet_b, t_b = master.cpu_seconds(), fleet.cpu_seconds(), time.monotonic()
        sched_b = master.sched()
        msgs = safe_counters(port).get("messages_total", msgs_a) - msgs_a
        psi = cpu_pressure()
        fleet.measure.clear()
        cpu_pct = (cpu_b - cpu_a) / (t_b - t_a) * 100
        fleet_pct = (fleet_b - fleet_a) / (t_b - t_a) * 100
        rss_max = max([rss_max, *rss_samples])
        where = memmap.describe(master.proc.pid)  # type: ignore[union-attr]
        by_state: dict[str, int] = {}
        try:
            for node in query_cluster(port, timeout=60)["nodes"]:
                by_state[node["state"]] = by_state.get(node["state"], 0) + 1
        except (OSError, p.ProtocolError):
            by_state["no answer within 60 s"] = args.slaves
        # Before the fleet's own stop below closes every connection:
        counters = safe_counters(port)
        deaths = counters.get("silent_deaths_total", -1) + counters.get(
            "closed_without_goodbye_total", 0
        )
        log_text = Path(f"{state_dir}/master.log").read_text(encoding="utf-8", errors="replace")
        stalls = log_text.count("event loop ran")
        results = fleet.stop()
    finally:
        master.stop()
    rtts_ms = [r * 1000 for r in results["rtts"]]
    joined = by_state.get("alive", 0) + by_state.get("suspect", 0)
    grown = statistics.median(rss_samples) - rss_idle
    per_slave = (
        f"{grown / joined / 1024:.1f} KiB per connected slave ({joined} at the end)"
        if joined
        else "per slave n/a (the master did not answer the final query)"
    )
    expected = args.slaves * args.duration / args.interval
    lines += [
        f"slaves: {args.slaves} in {args.processes} processes, heartbeat every {args.interval:g} s;"
        f" niceness of master and slaves {args.nice};"
        f" master environment {' '.join(args.master_env) or '(unchanged)'};"
        f" measured {args.duration:g} s; machine load average before/after:"
        f" {load_before:.1f}/{os.getloadavg()[0]:.1f}, CPU pressure (PSI some avg60) {psi}"
        " (other sessions share these 2 cores)",
        f"master CPU: {cpu_pct:.1f} % of one core while steady"
        f" ({join_cpu:.1f} % while {args.slaves} joined); slave processes {fleet_pct:.1f} %"
        f" ({join_fleet:.1f} % while joining); {msgs / (t_b - t_a):.0f} messages/s handled,"
        f" {(cpu_b - cpu_a) / max(msgs, 1) * 1e6:.1f} us of master CPU each",
        f"master threads waited runnable for a CPU {sched_b[1] - sched_a[1]:.1f} s and ran"
        f" {sched_b[0] - sched_a[0]:.1f} s of the {t_b - t_a:.1f} s measured (Linux schedstat):"
        " waiting is time the 2 shared cores (simulated slaves, other sessions) were busy",
        f"master RSS: max {rss_max / MB:.1f} MB,"
        f" median {statistics.median(rss_samples) / MB:.1f} MB while steady;"
        f" {rss_idle / MB:.1f} MB before the fleet joined: {per_slave}",
        f"master RSS by mapping (bench/memmap.py): {where}",
        f"heartbeat round trip: p50 {percentile(rtts_ms, 50):.2f} ms,"
        f" p99 {percentile(rtts_ms, 99):.2f} ms, max {max(rtts_ms, default=float('nan')):.1f} ms"
        f" over {len(rtts_ms)} acks ({len(rtts_ms) / expected * 100:.1f} % of {expected:.0f}"
        f" sent), {results['late']} not acked before the next",
        "all registered: "
        + (
            f"{registered_after:.1f} s after launching the fleet (connects spread over"
            f" {args.ramp:g} s)"
            if registered_after is not None
            else "NO, not within 60 s"
        ),
        "admission (admission.py) from launch to the end: "
        + ", ".join(
            f"{name} {counters.get(name, '?')}"
            for name in (
                "connections_total",
                "accept_paused_total",
                "connections_evicted_total",
                "handshake_timeouts_total",
                "connections_refused_total",
                "tls_failures_total",
            )
        ),
        f"states at the end: {by_state}; slaves marked dead during the run: {deaths};"
        f" master loop-lateness warnings: {stalls};"
        f" disconnects seen by slaves: {results['disconnects']};"
        f" errors: {sorted(set(results['errors']))}",
    ]
    targets = [
        ("master CPU <= 50 % of one core", cpu_pct <= 50),
        (
            f"master RSS <= {160 if args.tls else 128} MB",
            rss_max <= (160 if args.tls else 128) * MB,
        ),
        ("round trip p99 < 50 ms", percentile(rtts_ms, 99) < 50),
        ("all registered within 30 s", registered_after is not None and registered_after <= 30),
        (
            "none marked dead",
            deaths == 0 and by_state.get("dead", 0) == 0 and by_state.get("suspect", 0) == 0,
        ),
    ]
    lines.append(
        "targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets)
    )
    if args.no_append:
        print("\n".join(lines))
    else:
        tls = " with TLS" if args.tls else ""
        report.append(f"master_load: {args.slaves} slaves{tls}", lines)
    if args.keep:
        print(f"master state dir and log kept in {state_dir}")
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
