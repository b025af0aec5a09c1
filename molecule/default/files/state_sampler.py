"""Molecule verify: the state of every node at the master, sampled through a CA rotation.

Run on the master (as root, with the Pi's virtualenv) while playbooks/rotate-ca.yml
runs; every ``INTERVAL`` seconds it asks ``rpicluster status --json`` (a new
process each time, so it reads the credential files as they are then: the
master's certificate and CA change under it) and appends one JSON line
``{"t": epoch, "nodes": {name: state}}`` or ``{"t": epoch, "error": "..."}`` to
OUT. It stops when STOP exists, or after ``LIMIT`` seconds whatever happens.

  python state_sampler.py CLI OUT STOP

``report`` summarises a file: per node, the longest stretch not ``alive`` (from
the first sample that was not alive to the next one that was) and the longest
stretch ``dead``; and the longest stretch the master did not answer.

  python state_sampler.py report OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

INTERVAL = 0.5
LIMIT = 1800.0


def sample(cli: str, out: str, stop: str) -> None:
    started = time.time()
    with open(out, "a", encoding="utf-8") as handle:
        while not os.path.exists(stop) and time.time() - started < LIMIT:
            now = time.time()
            run = subprocess.run(
                [cli, "status", "--json", "--timeout", "2"],
                capture_output=True,
                text=True,
                check=False,
            )
            try:
                doc = json.loads(run.stdout)
                line = {"t": now, "nodes": {n.get("name"): n.get("state") for n in doc["nodes"]}}
            except (ValueError, KeyError, TypeError):
                line = {"t": now, "error": (run.stderr or run.stdout).strip()[-200:]}
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            time.sleep(max(0.0, INTERVAL - (time.time() - now)))


def longest(samples: list[tuple[float, bool]]) -> float:
    """Longest time from a sample where the condition held to the next where it did not."""
    best, since = 0.0, None
    for t, bad in samples:
        if bad and since is None:
            since = t
        elif not bad and since is not None:
            best, since = max(best, t - since), None
    if since is not None and samples:
        best = max(best, samples[-1][0] - since)
    return round(best, 1)


def report(out: str) -> None:
    with open(out, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    names = sorted({name for line in lines for name in line.get("nodes", {})})
    answered = [line for line in lines if "nodes" in line]
    doc = {
        "samples": len(lines),
        "seconds": round(lines[-1]["t"] - lines[0]["t"], 1) if lines else 0,
        "master_unanswered_max": longest([(line["t"], "error" in line) for line in lines]),
        "not_alive_max": {
            name: longest([(x["t"], x["nodes"].get(name) != "alive") for x in answered])
            for name in names
        },
        "dead_max": {
            name: longest([(x["t"], x["nodes"].get(name) == "dead") for x in answered])
            for name in names
        },
        "states_seen": {
            name: sorted({str(x["nodes"].get(name)) for x in answered}) for name in names
        },
    }
    print(json.dumps(doc))


if __name__ == "__main__":
    if sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        sample(sys.argv[1], sys.argv[2], sys.argv[3])
